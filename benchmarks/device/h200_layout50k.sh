#!/bin/bash
# (2026-12-03, eleventh session; carry .whl/ + .data/.) Issue 12, after stream.model_thread and
# extract.NHWC_MIN_IMAGES = 50,000 (was 100,000): CIFAR-10 train through `dhf build-index` as a
# user runs it (auto: NHWC at 50,000 images now) against NCHW forced, alternating x3; then
# bench_build.py on the same files (decode alone, model alone, the command).
COMPILE_EXTRA="$PWD/benchmarks" source "$(dirname "$0")/setup_compiled.sh"
mkdir -p /tmp/data && tar xzf .data/cifar10-jpg.tar.gz -C /tmp/data
python3 -c "import sys; sys.path.insert(0, 'benchmarks'); import bench_build as b; b.make_model('/tmp/m32.pt', 'efficientnet_lite0', 48, 32, None)"
t setup
b() {  # name layout
  rm -rf /tmp/ix; local s=$(date +%s%N)
  DHF_TRACE=1 DHF_CUDA_LAYOUT=$2 timeout 80 python3 -m deephash_faiss.cli build-index /tmp/data/cifar10/train --model /tmp/m32.pt -o /tmp/ix --device cuda --batch-size 256 > $R/$1.log 2>&1
  echo "$1 wall $(( ($(date +%s%N) - s) / 1000000 )) ms" >> $R/$1.log; t "$1"
  grep -h "indexed\|time:\|wall\|warm-up starts" $R/$1.log | tr '\r' '\n' | grep -v "it/s" | cut -c1-160
}
b auto1 ""; b nchw1 contiguous; b auto2 ""; b nchw2 contiguous; b auto3 ""; b nchw3 contiguous
timeout 200 python3 benchmarks/bench_build.py --images /tmp/data/cifar10/train --model /tmp/m32.pt --load-size 32 --device cuda --batch-size 256 --decode-kinds process --json $R/h200_cifar10_train_layout50k.json > $R/bench.log 2>&1; t "bench rc $?"
tail -n 1 $R/bench.log | cut -c1-1500
cd $OUT && tar czf r.tgz r && rm -rf r
