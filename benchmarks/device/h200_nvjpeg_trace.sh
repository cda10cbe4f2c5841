#!/bin/bash
# (Prepared 2026-12-03 for the next session with device time; carry .whl/ + .whlS/ (py-spy) +
# .data/.) Issue 12: why the nvjpeg build's first batch takes 6.5-8.5 s (PIL: 2.3 s) when each
# piece alone takes < 1 s. 30,000 photos; `dhf build-index` with DHF_TRACE=1 for pil and nvjpeg
# (the encoder's start-up events, timestamped, per thread), then the nvjpeg build under py-spy.
T0=$(date +%s); t() { echo "[$(( $(date +%s) - T0 )) s] $*"; }
python3 -m pip install -q --no-index --no-deps --no-cache-dir --target /root/site .whl/*.whl .whlS/*.whl || exit 1
export PYTHONPATH=/root/site:$PWD PYTHONUNBUFFERED=1 PYTHONPYCACHEPREFIX=/tmp/pyc PATH=/root/site/bin:$PATH
R=$OUT/r; mkdir -p $R
python3 benchmarks/make_photos.py --archive .data/cifar10-jpg.tar.gz --n 30000 --out /tmp/photos > $R/photos.log 2>&1
python3 -c "import sys; sys.path.insert(0, 'benchmarks'); import bench_build as b; b.make_model('/tmp/m224.pt', 'efficientnet_lite0', 48, None, None)"
t setup
for D in pil nvjpeg pil nvjpeg; do rm -rf /tmp/ix; s=$(date +%s%N); DHF_TRACE=1 timeout 90 python3 -m deephash_faiss.cli build-index /tmp/photos --model /tmp/m224.pt -o /tmp/ix --device cuda --decoder $D --batch-size 256 >> $R/trace_$D.log 2>&1; echo "wall $(( ($(date +%s%N) - s) / 1000000 )) ms" >> $R/trace_$D.log; t "$D"; done
rm -rf /tmp/ix; timeout 120 py-spy record --idle --threads -r 250 -f raw -o $R/spy_nvjpeg.txt -- python3 -m deephash_faiss.cli build-index /tmp/photos --model /tmp/m224.pt -o /tmp/ix --device cuda --decoder nvjpeg --batch-size 256 --quiet > $R/spy.log 2>&1; t "spy rc $?"
# (added 2026-12-03, before the first run) who holds the GIL (the steady rate, 5,200-6,000 img/s,
# is below decode alone and model alone run in series), and eager CUDA module loading (whether
# lazy kernel loading in two threads at once is the first batch's extra seconds)
rm -rf /tmp/ix; timeout 120 py-spy record --gil --threads -r 250 -f raw -o $R/spy_gil_nvjpeg.txt -- python3 -m deephash_faiss.cli build-index /tmp/photos --model /tmp/m224.pt -o /tmp/ix --device cuda --decoder nvjpeg --batch-size 256 --quiet > $R/spy_gil.log 2>&1; t "spy gil rc $?"
rm -rf /tmp/ix; CUDA_MODULE_LOADING=EAGER DHF_TRACE=1 timeout 90 python3 -m deephash_faiss.cli build-index /tmp/photos --model /tmp/m224.pt -o /tmp/ix --device cuda --decoder nvjpeg --batch-size 256           >> $R/trace_nvjpeg_eager.log 2>&1; t "nvjpeg eager"
grep -h -v 'it/s\|img/s]' $R/trace_*.log | grep -v '^\s*$' | cut -c1-200 | head -n 150
cd $OUT && tar czf r.tgz r && rm -rf r; ls -la $OUT
