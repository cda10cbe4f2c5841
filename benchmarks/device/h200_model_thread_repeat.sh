#!/bin/bash
# (2026-12-03, eleventh session; carry .whl/ + .data/.) Issue 12: h200_model_thread.sh again on
# CIFAR-10 train only, three pairs per layout: did the model thread cost NCHW 0.2 s of encode
# phase (both pairs there, inside that call's noise)? new = main (stream.model_thread, NHWC from
# 50,000 images: auto is NHWC here); old = pushes patched back onto the calling thread.
COMPILE_EXTRA="$PWD/benchmarks" source "$(dirname "$0")/setup_compiled.sh"
mkdir -p /tmp/data && tar xzf .data/cifar10-jpg.tar.gz -C /tmp/data
python3 -c "import sys; sys.path.insert(0, 'benchmarks'); import bench_build as b; b.make_model('/tmp/m32.pt', 'efficientnet_lite0', 48, 32, None)"
t setup
OLD='import deephash_faiss.stream as S
S._CudaRunner.push = lambda self, x, meta: self._push(x, meta)
S._CudaRunner.flush = lambda self: self._drain(0)
from deephash_faiss.cli import main; main()'
NEW='from deephash_faiss.cli import main; main()'
b() {  # name layout code
  rm -rf /tmp/ix; local s=$(date +%s%N)
  DHF_CUDA_LAYOUT=$2 timeout 40 python3 -c "$3" build-index /tmp/data/cifar10/train --model /tmp/m32.pt -o /tmp/ix --device cuda --batch-size 256 > $R/$1.log 2>&1
  echo "$1 wall $(( ($(date +%s%N) - s) / 1000000 )) ms" >> $R/$1.log; t "$1"
  grep -h "indexed\|time:\|wall" $R/$1.log | tr '\r' '\n' | grep -v "it/s" | cut -c1-160
}
b warmup contiguous "$NEW"  # the machine's first CUDA process (kernel cache cold): not counted
for i in 1 2 3; do
  b nchw_new$i contiguous "$NEW"; b nchw_old$i contiguous "$OLD"; b auto_new$i "" "$NEW"; b auto_old$i "" "$OLD"
done
cd $OUT && tar czf r.tgz r && rm -rf r
