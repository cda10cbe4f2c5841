#!/bin/bash
# (2026-12-03, tenth session; carry .whl/ + .data/.) The one-shot `dhf search` timing
# (bench_oneshot.py) re-run with the bytecode compiled (setup_compiled.sh: the host ships torch
# without __pycache__; the earlier runs, oneshot_search_h200_quiet.json, compiled torch from source
# in every process): the index and queries of h200_oneshot_and_long_runs_a.sh (2,000 CIFAR-10 test
# images, cats and dogs, unlabelled: PCA/ITQ 128 bits on Lite0's ImageNet fc7; 256 airplane queries).
source "$(dirname "$0")/setup_compiled.sh"
mkdir -p /tmp/x /tmp/imgs /tmp/qsrc; [ -d /tmp/data/cifar10 ] || { mkdir -p /tmp/data && tar xzf .data/cifar10-jpg.tar.gz -C /tmp/data; }
cp /tmp/data/cifar10/test/cat/*.jpg /tmp/imgs/; for f in /tmp/data/cifar10/test/dog/*.jpg; do cp $f /tmp/imgs/d_$(basename $f); done
ls /tmp/data/cifar10/test/airplane/*.jpg | head -256 | xargs -I{} cp {} /tmp/qsrc/
t setup; DHF="python3 -m deephash_faiss.cli"
rm -rf /tmp/idx; $DHF build-index /tmp/imgs --out /tmp/idx --device cuda -q > $R/build.log 2>&1; t "build rc $?"; tail -2 $R/build.log
$DHF info --index /tmp/idx > $R/info.txt 2>&1
timeout 240 python3 benchmarks/bench_oneshot.py --index /tmp/idx --queries /tmp/qsrc --n 1 16 64 256 --devices cpu cuda auto --rounds 2 --json $R/oneshot_search_h200_compiled.json > $R/oneshot.log 2>&1; t "oneshot rc $?"
tail -n 8 $R/oneshot.log
cd $OUT && tar czf r.tgz r && rm -rf r; ls -la $OUT
