#!/bin/bash
# (2026-12-03, eighth session; carry .whl/ + .data/.) Issue 12 after the trace run
# (h200_nvjpeg_trace.sh): the nvjpeg first batch's extra seconds were `import torchvision`
# (-> torch._dynamo) compiled from source in the GPU-decode thread, now avoided
# (gpudecode.image_ops). 1) Does this machine's Python cache bytecode? (Every process here seemed
# to compile torch from source: import torch 3.3-4.6 s.) Times `import torch` before and after
# `compileall` (what pip does at install). 2) With bytecode compiled: 30,000 photos, the command
# with nvjpeg and pil; 200,000 photos, bench_build.py with nvjpeg (decode alone, model alone, the
# command) and the command with --decoder auto (nvjpeg + NHWC from 100,000).
T0=$(date +%s); t() { echo "[$(( $(date +%s) - T0 )) s] $*"; }
python3 -m pip install -q --no-index --no-deps --no-cache-dir --target /root/site .whl/*.whl || exit 1
export PYTHONPATH=/root/site:$PWD PYTHONUNBUFFERED=1 PYTHONPYCACHEPREFIX=/tmp/pyc
R=$OUT/r; mkdir -p $R
ti() { local s=$(date +%s%N); python3 -c "import torch" ; echo "$1 import torch $(( ($(date +%s%N) - s) / 1000000 )) ms"; }
{
python3 -c "import sys, os; print('dont_write_bytecode', sys.flags.dont_write_bytecode, 'env', os.environ.get('PYTHONDONTWRITEBYTECODE'), 'prefix', sys.pycache_prefix, sys.version)"
SP=$(python3 -c "import importlib.util, os; print(os.path.dirname(os.path.dirname(importlib.util.find_spec('torch').origin)))")
echo "site-packages $SP"; ls -d $SP/torch/__pycache__ 2>&1; ls $SP/torch/__pycache__ 2>/dev/null | head -3
ti cold1; ti cold2
s=$(date +%s); python3 -m compileall -q -j 16 $SP /root/site $PWD/deephash_faiss > /dev/null 2>&1; echo "compileall rc $? $(( $(date +%s) - s )) s"
ti compiled1; ti compiled2
} > $R/bytecode.log 2>&1; cat $R/bytecode.log; t bytecode
python3 benchmarks/make_photos.py --archive .data/cifar10-jpg.tar.gz --n 30000 --out /tmp/p30k > $R/photos30k.log 2>&1
python3 -c "import sys; sys.path.insert(0, 'benchmarks'); import bench_build as b; b.make_model('/tmp/m224.pt', 'efficientnet_lite0', 48, None, None)"
t "photos 30k"
b() {  # name folder decoder
  rm -rf /tmp/ix; local s=$(date +%s%N)
  DHF_TRACE=1 timeout 150 python3 -m deephash_faiss.cli build-index $2 --model /tmp/m224.pt -o /tmp/ix --device cuda --decoder $3 --batch-size 256 > $R/$1.log 2> $R/$1_trace.log
  echo "$1 $3 product wall $(( ($(date +%s%N) - s) / 1000000 )) ms" >> $R/$1.log; t "$1"
}
b p30k_nvjpeg /tmp/p30k nvjpeg; b p30k_pil /tmp/p30k pil; b p30k_nvjpeg2 /tmp/p30k nvjpeg
rm -rf /tmp/p30k
python3 benchmarks/make_photos.py --archive .data/cifar10-jpg.tar.gz --n 200000 --out /tmp/photos > $R/photos.log 2>&1
du -sh /tmp/photos >> $R/photos.log; t "photos 200k"
b p200k_auto /tmp/photos auto
timeout 280 python3 benchmarks/bench_build.py --images /tmp/photos --model /tmp/m224.pt --device cuda --decoder nvjpeg --batch-size 256 --decode-kinds process --model-n 4096 --json $R/h200_photos200k.json > $R/bench.log 2>&1; t "bench rc $?"
for f in $R/p*.log; do echo "== $f"; grep -h "indexed\|time:\|wall\|warm-up" $f ${f%.log}_trace.log 2>/dev/null | tr '\r' '\n' | grep -v "it/s" | cut -c1-200; done
tail -n 3 $R/bench.log | cut -c1-1500
cd $OUT && tar czf r.tgz r && rm -rf r; ls -la $OUT
