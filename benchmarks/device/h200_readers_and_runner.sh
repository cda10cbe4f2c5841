#!/bin/bash
# (2026-12-03, ninth session; carry .whl/ + .data/.) Issue 12, after stream.NVJPEG_READERS = 2
# (diag_decode_threads.py: decode fed by 2 readers 10,094-12,332 img/s, by 16 4,665-8,500):
# ${N:-60000} photo-sized JPEGs through `dhf build-index` (auto = nvjpeg + NHWC) with 2 readers,
# 16 readers (the old default, NVJPEG_READERS patched), 2 again; then diag_runner.py on CIFAR-10
# train's shape (the product's _CudaRunner alone against encode_array, GIL load) and one CIFAR-10
# build with DHF_TRACE=1. Bytecode compiled first (setup_compiled.sh).
source "$(dirname "$0")/setup_compiled.sh"
mkdir -p /tmp/data && tar xzf .data/cifar10-jpg.tar.gz -C /tmp/data
python3 -c "import sys; sys.path.insert(0, 'benchmarks'); import bench_build as b; b.make_model('/tmp/m32.pt', 'efficientnet_lite0', 48, 32, None); b.make_model('/tmp/m224.pt', 'efficientnet_lite0', 48, None, None)"
t setup
python3 benchmarks/make_photos.py --archive .data/cifar10-jpg.tar.gz --n ${N:-60000} --out /tmp/photos > $R/photos.log 2>&1; t "photos made"
sleep 10
b() {  # name folder model readers
  rm -rf /tmp/ix; local s=$(date +%s%N)
  DHF_TRACE=1 timeout 100 python3 -c "import sys; import deephash_faiss.stream as s; s.NVJPEG_READERS = int(sys.argv.pop(1)); from deephash_faiss.cli import main; main()" $4 build-index $2 --model $3 -o /tmp/ix --device cuda --batch-size 256 > $R/$1.log 2> $R/$1_trace.log
  echo "$1 readers $4 product wall $(( ($(date +%s%N) - s) / 1000000 )) ms" >> $R/$1.log; t "$1"
}
b ph_r2a /tmp/photos /tmp/m224.pt 2; b ph_r16 /tmp/photos /tmp/m224.pt 16; b ph_r2b /tmp/photos /tmp/m224.pt 2
timeout 120 python3 benchmarks/diag_runner.py --model /tmp/m32.pt --json $R/h200_diag_runner.json > $R/diag_runner.log 2>&1; t "runner rc $?"; tail -n 1 $R/diag_runner.log
b cifar_trace /tmp/data/cifar10/train /tmp/m32.pt 2
for n in ph_r2a ph_r16 ph_r2b cifar_trace; do echo "== $n"; grep -h "indexed\|time:\|wall\|decode pool" $R/$n.log $R/${n}_trace.log | tr '\r' '\n' | grep -v "it/s" | cut -c1-200; done
cd $OUT && tar czf r.tgz r && rm -rf r; ls -la $OUT
