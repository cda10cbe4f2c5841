#!/bin/bash
# (2026-12-03, ninth session; carry .whl/ + .whlS/ (py-spy) + .data/.) Issue 12, CIFAR-10 train:
# what the build loses between the model (11,449 img/s NCHW alone) and its encode phase (~8,150
# img/s after the first batch): benchmarks/diag_runner.py (the product's _CudaRunner alone, with
# and without 8 GIL-holding threads, per layout), then one build with DHF_TRACE=1 and one under
# py-spy (every thread, idle included, raw stacks). Bytecode compiled first (setup_compiled.sh).
source "$(dirname "$0")/setup_compiled.sh"
python3 -m pip install -q --no-index --no-deps --no-cache-dir --target /root/site .whlS/*.whl || exit 1
mkdir -p /tmp/data && tar xzf .data/cifar10-jpg.tar.gz -C /tmp/data
python3 -c "import sys; sys.path.insert(0, 'benchmarks'); import bench_build as b; b.make_model('/tmp/m32.pt', 'efficientnet_lite0', 48, 32, None)"
t setup
timeout 150 python3 benchmarks/diag_runner.py --model /tmp/m32.pt --json $R/h200_diag_runner.json > $R/diag_runner.log 2>&1; t "runner rc $?"; tail -n 1 $R/diag_runner.log
rm -rf /tmp/ix; s=$(date +%s%N); DHF_TRACE=1 timeout 100 python3 -m deephash_faiss.cli build-index /tmp/data/cifar10/train --model /tmp/m32.pt -o /tmp/ix --device cuda --batch-size 256 > $R/cifar_trace.log 2>&1
echo "wall $(( ($(date +%s%N) - s) / 1000000 )) ms" >> $R/cifar_trace.log; t "trace build"
rm -rf /tmp/ix; timeout 120 /root/site/bin/py-spy record --idle --threads -r 250 -f raw -o $R/spy_cifar.txt -- python3 -m deephash_faiss.cli build-index /tmp/data/cifar10/train --model /tmp/m32.pt -o /tmp/ix --device cuda --batch-size 256 --quiet > $R/spy.log 2>&1; t "spy rc $?"
grep -h "indexed\|time:\|wall" $R/cifar_trace.log | cut -c1-200
cd $OUT && tar czf r.tgz r && rm -rf r; ls -la $OUT
