#!/bin/bash
# (2026-12-03, twelfth session; carry .whl/ + .data/.) Issue 12: the "hybrid" layout (a depthwise
# model's first 25,000 images of a job run NCHW while NHWC's plans are built in a second model
# thread, the rest NHWC) and shards published by hard link. The CUDA tests first; then CIFAR-10
# train through `dhf build-index` as a user runs it (auto: hybrid now) against NHWC and NCHW
# forced, alternating x3; then bench_build.py on the same files.
COMPILE_EXTRA="$PWD/benchmarks" source "$(dirname "$0")/setup_compiled.sh"
mkdir -p /tmp/data && tar xzf .data/cifar10-jpg.tar.gz -C /tmp/data
python3 -c "import sys; sys.path.insert(0, 'benchmarks'); import bench_build as b; b.make_model('/tmp/m32.pt', 'efficientnet_lite0', 48, 32, None)"
t setup
timeout 200 python3 -m pytest -q -x tests/test_cuda.py -p no:cacheprovider > $R/pytest_cuda.txt 2>&1; t "pytest rc $?"
tail -n 3 $R/pytest_cuda.txt
b() {  # name layout
  rm -rf /tmp/ix; local s=$(date +%s%N)
  DHF_TRACE=1 DHF_CUDA_LAYOUT=$2 timeout 80 python3 -m deephash_faiss.cli build-index /tmp/data/cifar10/train --model /tmp/m32.pt -o /tmp/ix --device cuda --batch-size 256 > $R/$1.log 2>&1
  echo "$1 wall $(( ($(date +%s%N) - s) / 1000000 )) ms" >> $R/$1.log; t "$1"
  grep -h "indexed\|time:\|wall\|warm-up\|waiting" $R/$1.log | tr '\r' '\n' | grep -v "it/s" | cut -c1-160
}
b auto1 ""; b nhwc1 channels_last; b nchw1 contiguous
b auto2 ""; b nhwc2 channels_last; b nchw2 contiguous
b auto3 ""; b nhwc3 channels_last; b nchw3 contiguous
python3 -m deephash_faiss.cli verify /tmp/ix > $R/verify.txt 2>&1; t "verify rc $?"
timeout 150 python3 benchmarks/bench_build.py --images /tmp/data/cifar10/train --model /tmp/m32.pt --load-size 32 --device cuda --batch-size 256 --decode-kinds process --json $R/h200_cifar10_train_hybrid.json > $R/bench.log 2>&1; t "bench rc $?"
tail -n 1 $R/bench.log | cut -c1-1500
cd $OUT && tar czf r.tgz r && rm -rf r
