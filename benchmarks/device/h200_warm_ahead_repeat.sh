#!/bin/bash
# (2026-12-03, eighth session; carry .whl/ + .data/.) Issue 12, repeats of h200_warm_ahead.sh's
# builds at the same code: CIFAR-10 train with the default layout (NCHW below 100,000 images)
# alternating with NHWC forced (DHF_CUDA_LAYOUT=channels_last: with warm-ahead the decoders finish
# while NHWC builds its kernels), then 200,000 photos (auto = nvjpeg + NHWC) twice more.
source "$(dirname "$0")/setup_compiled.sh"  # the set-up lines it ran, moved there unchanged
mkdir -p /tmp/data && tar xzf .data/cifar10-jpg.tar.gz -C /tmp/data
python3 -c "import sys; sys.path.insert(0, 'benchmarks'); import bench_build as b; b.make_model('/tmp/m32.pt', 'efficientnet_lite0', 48, 32, None); b.make_model('/tmp/m224.pt', 'efficientnet_lite0', 48, None, None)"
t setup
b() {  # name folder model decoder
  rm -rf /tmp/ix; local s=$(date +%s%N)
  DHF_TRACE=1 timeout 150 python3 -m deephash_faiss.cli build-index $2 --model $3 -o /tmp/ix --device cuda --decoder $4 --batch-size 256 > $R/$1.log 2> $R/$1_trace.log
  echo "$1 $4 ${DHF_CUDA_LAYOUT:-default} product wall $(( ($(date +%s%N) - s) / 1000000 )) ms" >> $R/$1.log; t "$1"
}
for i in 1 2; do b cifar_nchw$i /tmp/data/cifar10/train /tmp/m32.pt auto; DHF_CUDA_LAYOUT=channels_last b cifar_nhwc$i /tmp/data/cifar10/train /tmp/m32.pt auto; done
python3 benchmarks/make_photos.py --archive .data/cifar10-jpg.tar.gz --n 200000 --out /tmp/photos > $R/photos.log 2>&1; t "photos made"
sleep 20  # let the load of making the photos settle
b p200k_c /tmp/photos /tmp/m224.pt auto; b p200k_d /tmp/photos /tmp/m224.pt auto
for f in $R/cifar_*[0-9].log $R/p200k_?.log; do echo "== $f"; grep -h "indexed\|time:\|wall\|warm" $f ${f%.log}_trace.log | tr '\r' '\n' | grep -v "it/s" | cut -c1-200; done
cd $OUT && tar czf r.tgz r && rm -rf r; ls -la $OUT
