#!/bin/bash
# (2026-12-03, eighth session; carry .whl/ + .data/.) Issue 12, after gpudecode.image_ops (no
# torchvision import) and stream's warm-ahead (decoders run ahead while the model warms up,
# WARM_AHEAD_BYTES) + one-shape decode_batch without a scatter: the CUDA tests; CIFAR-10 train
# (50,000 32-px JPEGs) through bench_build.py and the command; 200,000 photo-sized JPEGs through
# the command (auto = nvjpeg + NHWC) twice. Bytecode compiled first (compileall, as pip does at
# install: this machine's Python runs with PYTHONDONTWRITEBYTECODE=1 and torch has no __pycache__,
# so every process would compile torch from source: import torch 4.2-5.9 s against 2.1-2.3 s).
COMPILE_EXTRA="$PWD/tests $PWD/benchmarks" source "$(dirname "$0")/setup_compiled.sh"  # the set-up lines it ran, moved there unchanged
mkdir -p /tmp/data && tar xzf .data/cifar10-jpg.tar.gz -C /tmp/data
python3 benchmarks/make_photos.py --archive .data/cifar10-jpg.tar.gz --n 200000 --out /tmp/photos > $R/photos.log 2>&1 &
PH=$!
t setup
timeout 150 python3 -m pytest -q -p no:cacheprovider -rs tests/test_cuda.py tests/test_gpu.py > $R/pytest_cuda_h200.txt 2>&1; t "tests rc $?"; tail -n 2 $R/pytest_cuda_h200.txt
wait $PH; t "photos made"
b() {  # name folder model decoder
  rm -rf /tmp/ix; local s=$(date +%s%N)
  DHF_TRACE=1 timeout 150 python3 -m deephash_faiss.cli build-index $2 --model $3 -o /tmp/ix --device cuda --decoder $4 --batch-size 256 > $R/$1.log 2> $R/$1_trace.log
  echo "$1 $4 product wall $(( ($(date +%s%N) - s) / 1000000 )) ms" >> $R/$1.log; t "$1"
}
timeout 150 python3 benchmarks/bench_build.py --images /tmp/data/cifar10/train --model /tmp/m32.pt --make-model --load-size 32 --device cuda --batch-size 256 --decode-kinds process --json $R/h200_cifar10_train.json > $R/cifar.log 2>&1; t "cifar bench rc $?"
b cifar_a /tmp/data/cifar10/train /tmp/m32.pt auto; b cifar_b /tmp/data/cifar10/train /tmp/m32.pt auto
python3 -c "import sys; sys.path.insert(0, 'benchmarks'); import bench_build as b; b.make_model('/tmp/m224.pt', 'efficientnet_lite0', 48, None, None)"
b p200k_a /tmp/photos /tmp/m224.pt auto; b p200k_b /tmp/photos /tmp/m224.pt auto
for f in $R/cifar_?.log $R/p200k_?.log; do echo "== $f"; grep -h "indexed\|time:\|wall\|warm" $f ${f%.log}_trace.log | tr '\r' '\n' | grep -v "it/s" | cut -c1-200; done
tail -n 1 $R/cifar.log | cut -c1-1200
cd $OUT && tar czf r.tgz r && rm -rf r; ls -la $OUT
