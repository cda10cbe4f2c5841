#!/bin/bash
# (2026-12-03, eleventh session; carry .whl/ + .data/.) Issue 12: torch keeps cuDNN's execution
# plans per thread, and the encoder warmed the model up in one thread and ran its batches in
# another, so the first batch paid the plans twice (NHWC: 2-3 s more). Now every forward pass
# runs in the process's one model thread (stream.model_thread). bench_first_batch.py: the first
# pass in a thread after a whole pass in another thread (_elsewhere) against a fresh process;
# CIFAR-10 train and 200,000 photo-sized JPEGs through `dhf build-index`, new against old
# (pushes patched back onto the calling thread), alternating; then the CUDA tests.
COMPILE_EXTRA="$PWD/tests $PWD/benchmarks" source "$(dirname "$0")/setup_compiled.sh"
mkdir -p /tmp/data && tar xzf .data/cifar10-jpg.tar.gz -C /tmp/data
python3 -c "import sys; sys.path.insert(0, 'benchmarks'); import bench_build as b; b.make_model('/tmp/m32.pt', 'efficientnet_lite0', 48, 32, None); b.make_model('/tmp/m224.pt', 'efficientnet_lite0', 48, None, None)"
t setup
python3 benchmarks/make_photos.py --archive .data/cifar10-jpg.tar.gz --n 200000 --out /tmp/photos > $R/photos.log 2>&1; t "photos made"
timeout 100 python3 benchmarks/bench_first_batch.py --json $R/h200_first_batch_elsewhere.json --sizes 32 --batch 256 --steady 10 \
  --cases product_channels_last product_channels_last_elsewhere product_contiguous product_contiguous_elsewhere > $R/first_batch.log 2>&1
t "first batch rc $?"; cut -c1-300 $R/first_batch.log
OLD='import deephash_faiss.stream as S
S._CudaRunner.push = lambda self, x, meta: self._push(x, meta)
S._CudaRunner.flush = lambda self: self._drain(0)
from deephash_faiss.cli import main; main()'
NEW='from deephash_faiss.cli import main; main()'
b() {  # name layout folder model code
  rm -rf /tmp/ix; local s=$(date +%s%N)
  DHF_TRACE=1 DHF_CUDA_LAYOUT=$2 timeout 80 python3 -c "$5" build-index $3 --model $4 -o /tmp/ix --device cuda --batch-size 256 > $R/$1.log 2>&1
  echo "$1 wall $(( ($(date +%s%N) - s) / 1000000 )) ms" >> $R/$1.log; t "$1"
  grep -h "indexed\|time:\|wall\|warm" $R/$1.log | tr '\r' '\n' | grep -v "it/s" | cut -c1-160
}
C="/tmp/data/cifar10/train /tmp/m32.pt"
b nchw_new1 contiguous $C "$NEW"; b nchw_old1 contiguous $C "$OLD"; b cl_new1 channels_last $C "$NEW"; b cl_old1 channels_last $C "$OLD"
b nchw_new2 contiguous $C "$NEW"; b nchw_old2 contiguous $C "$OLD"; b cl_new2 channels_last $C "$NEW"; b cl_old2 channels_last $C "$OLD"
P="/tmp/photos /tmp/m224.pt"
b p_new1 "" $P "$NEW"; b p_old1 "" $P "$OLD"; b p_new2 "" $P "$NEW"; b p_old2 "" $P "$OLD"
timeout 100 python3 -m pytest -q -p no:cacheprovider -rs tests/test_cuda.py tests/test_gpu.py > $R/pytest_cuda_h200.txt 2>&1; t "tests rc $?"; tail -n 3 $R/pytest_cuda_h200.txt
cd $OUT && tar czf r.tgz r && rm -rf r
