#!/bin/bash
# (2026-12-03, twelfth session; carry .whl/ + .data/.) Issue 12, after h200_hybrid.sh: the CUDA
# tests; CIFAR-10 train through `dhf build-index` (auto = hybrid) against NCHW forced, alternating
# x2, with the build's whole trace (DHF_TRACE=1: build start to finalize); 200,000 photo-sized
# JPEGs (nvjpeg) with auto (hybrid now) against NHWC forced (what auto was), alternating x2.
COMPILE_EXTRA="$PWD/tests $PWD/benchmarks" source "$(dirname "$0")/setup_compiled.sh"
mkdir -p /tmp/data && tar xzf .data/cifar10-jpg.tar.gz -C /tmp/data
python3 -c "import sys; sys.path.insert(0, 'benchmarks'); import bench_build as b; b.make_model('/tmp/m32.pt', 'efficientnet_lite0', 48, 32, None); b.make_model('/tmp/m224.pt', 'efficientnet_lite0', 48, None, None)"
t setup
python3 benchmarks/make_photos.py --archive .data/cifar10-jpg.tar.gz --n 200000 --out /tmp/photos > $R/photos.log 2>&1; t "photos made"
timeout 150 python3 -m pytest -q -p no:cacheprovider -rs tests/test_cuda.py tests/test_gpu.py > $R/pytest_cuda_h200.txt 2>&1; t "tests rc $?"; tail -n 3 $R/pytest_cuda_h200.txt
b() {  # name layout folder model
  rm -rf /tmp/ix; local s=$(date +%s%N)
  DHF_TRACE=1 DHF_CUDA_LAYOUT=$2 timeout 90 python3 -m deephash_faiss.cli build-index $3 --model $4 -o /tmp/ix --device cuda --batch-size 256 > $R/$1.log 2>&1
  echo "$1 wall $(( ($(date +%s%N) - s) / 1000000 )) ms" >> $R/$1.log; t "$1"
  grep -h "indexed\|time:\|wall" $R/$1.log | tr '\r' '\n' | grep -v "it/s" | cut -c1-160
}
C="/tmp/data/cifar10/train /tmp/m32.pt"
b c_auto1 "" $C; b c_nchw1 contiguous $C; b c_auto2 "" $C; b c_nchw2 contiguous $C
grep -h "dhf-trace" $R/c_auto2.log | grep -v "batch [12] " | cut -c1-120
P="/tmp/photos /tmp/m224.pt"
b p_auto1 "" $P; b p_nhwc1 channels_last $P; b p_auto2 "" $P; b p_nhwc2 channels_last $P
grep -h "dhf-trace" $R/p_auto2.log | grep -v "batch [12] " | cut -c1-120
cd $OUT && tar czf r.tgz r && rm -rf r
