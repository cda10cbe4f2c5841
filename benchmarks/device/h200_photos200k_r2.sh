#!/bin/bash
# (2026-12-03, tenth session; carry .whl/ + .data/.) Issue 12 at main with stream.NVJPEG_READERS = 2:
# CIFAR-10 train through `dhf build-index` twice (PIL, NCHW), diag_runner.py (the product's CUDA
# runner alone against encode_array at CIFAR-10's shape, with and without GIL load; its last run
# timed out silently), then 200,000 photo-sized JPEGs made (make_photos.py) and built twice
# (auto = nvjpeg + NHWC). The 200,000-photo builds were last run with 16 readers (4,912-5,398 img/s).
source "$(dirname "$0")/setup_compiled.sh"
mkdir -p /tmp/data && tar xzf .data/cifar10-jpg.tar.gz -C /tmp/data
python3 -c "import sys; sys.path.insert(0, 'benchmarks'); import bench_build as b; b.make_model('/tmp/m32.pt', 'efficientnet_lite0', 48, 32, None); b.make_model('/tmp/m224.pt', 'efficientnet_lite0', 48, None, None)"
t setup; nvidia-smi --query-gpu=name,utilization.gpu,memory.used --format=csv,noheader
b() {  # name folder model
  rm -rf /tmp/ix; local s=$(date +%s%N)
  DHF_TRACE=1 timeout 150 python3 -m deephash_faiss.cli build-index $2 --model $3 -o /tmp/ix --device cuda --batch-size 256 > $R/$1.log 2> $R/$1_trace.log
  echo "$1 product wall $(( ($(date +%s%N) - s) / 1000000 )) ms" >> $R/$1.log; t "$1"; grep -h "indexed\|wall" $R/$1.log
}
b cifar_a /tmp/data/cifar10/train /tmp/m32.pt; b cifar_b /tmp/data/cifar10/train /tmp/m32.pt
timeout 150 python3 benchmarks/diag_runner.py --model /tmp/m32.pt --json $R/h200_diag_runner.json > $R/diag_runner.log 2>&1; t "runner rc $?"; grep img/s $R/diag_runner.log
python3 benchmarks/make_photos.py --archive .data/cifar10-jpg.tar.gz --n ${N:-200000} --out /tmp/photos > $R/photos.log 2>&1; t "photos made"
sleep 15  # let the load of making the photos settle
b p200k_a /tmp/photos /tmp/m224.pt; b p200k_b /tmp/photos /tmp/m224.pt
for n in cifar_a cifar_b p200k_a p200k_b; do echo "== $n"; grep -h "indexed\|time:\|wall\|decode pool\|warm" $R/$n.log $R/${n}_trace.log | tr '\r' '\n' | grep -v "it/s" | cut -c1-200; done
cd $OUT && tar czf r.tgz r && rm -rf r; ls -la $OUT
