#!/bin/bash
# (Prepared 2026-12-03 for the next session with device time; carry .whl/ + .data/.) Issue 12 at
# scale: 200,000 photo-sized JPEGs (~9.4 GB; make_photos.py reuses CIFAR-10's tiles in a new
# order per round), where `--decoder auto` picks nvjpeg and the layout is NHWC: bench_build.py
# (decode alone, model alone, the command with --decoder auto), then the command with --decoder
# pil. Rates after the first batch are what the 1e9 projection in docs/scaling.md rests on.
T0=$(date +%s); t() { echo "[$(( $(date +%s) - T0 )) s] $*"; }
python3 -m pip install -q --no-index --no-deps --no-cache-dir --target /root/site .whl/*.whl || exit 1
export PYTHONPATH=/root/site:$PWD PYTHONUNBUFFERED=1 PYTHONPYCACHEPREFIX=/tmp/pyc
R=$OUT/r; mkdir -p $R
python3 benchmarks/make_photos.py --archive .data/cifar10-jpg.tar.gz --n 200000 --out /tmp/photos > $R/photos.log 2>&1
du -sh /tmp/photos >> $R/photos.log; t setup
timeout 300 python3 benchmarks/bench_build.py --images /tmp/photos --model /tmp/m224.pt --make-model --device cuda --decoder auto --batch-size 256 --decode-kinds process --model-n 4096 --json $R/h200_photos200k.json > $R/bench.log 2>&1; t "bench rc $?"
rm -rf /tmp/ix; s=$(date +%s%N); DHF_TRACE=1 timeout 150 python3 -m deephash_faiss.cli build-index /tmp/photos --model /tmp/m224.pt -o /tmp/ix --device cuda --decoder pil --batch-size 256 --quiet > $R/photos_pil.log 2>&1; echo "photos200k pil product wall $(( ($(date +%s%N) - s) / 1000000 )) ms" >> $R/photos_pil.log; t pil
tail -n 4 $R/*.log | cut -c1-700
cd $OUT && tar czf r.tgz r && rm -rf r; ls -la $OUT
