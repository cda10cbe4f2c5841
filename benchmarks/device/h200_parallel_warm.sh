#!/bin/bash
# (2026-12-03, eleventh session; carry .whl/ + .data/.) Issue 12: cuDNN builds its NHWC depthwise
# kernels at their first call, one layer after another (6 s of a 7 s first pass), which keeps
# small jobs on NCHW (11,400 img/s against NHWC's 18,700). extract.warm_convolutions runs every
# convolution once in parallel threads before the first pass. Does that build them in parallel?
# bench_first_batch.py per case in fresh processes, then CIFAR-10 train through `dhf build-index`
# in both layouts, with the parallel warm-up (new) and with it patched out (old), alternating;
# then the CUDA tests.
# As it ran (12:48 UTC, second try; the first stopped on a device-index error in the new code):
# the product then had extract.warm_convolutions, called by the encoder's warm-up thread. It did
# not help (plans are per thread: results/build/h200_parallel_warm_product.txt) and was not
# landed; its helper lives on as bench_first_batch.py's _parN cases, so the builds' "new" arm
# below no longer exists.
COMPILE_EXTRA="$PWD/tests $PWD/benchmarks" source "$(dirname "$0")/setup_compiled.sh"
mkdir -p /tmp/data && tar xzf .data/cifar10-jpg.tar.gz -C /tmp/data
python3 -c "import sys; sys.path.insert(0, 'benchmarks'); import bench_build as b; b.make_model('/tmp/m32.pt', 'efficientnet_lite0', 48, 32, None)"
t setup
timeout 150 python3 benchmarks/bench_first_batch.py --json $R/h200_first_batch_parallel.json --sizes 32 --batch 256 --steady 10 \
  --cases product_channels_last product_channels_last_par8 product_channels_last_par1 product_channels_last_par16 \
          product_channels_last_again product_channels_last_par8_again product_contiguous product_contiguous_par8 > $R/first_batch.log 2>&1
t "first batch rc $?"; cut -c1-400 $R/first_batch.log
OLD='import deephash_faiss.extract as E
E.warm_convolutions = lambda *a, **k: 0
from deephash_faiss.cli import main; main()'
NEW='from deephash_faiss.cli import main; main()'
b() {  # name layout code
  rm -rf /tmp/ix; local s=$(date +%s%N)
  DHF_TRACE=1 DHF_CUDA_LAYOUT=$2 timeout 60 python3 -c "$3" build-index /tmp/data/cifar10/train --model /tmp/m32.pt -o /tmp/ix --device cuda --batch-size 256 > $R/$1.log 2>&1
  echo "$1 wall $(( ($(date +%s%N) - s) / 1000000 )) ms" >> $R/$1.log; t "$1"
  grep -h "indexed\|time:\|wall\|warm" $R/$1.log | tr '\r' '\n' | grep -v "it/s" | cut -c1-160
}
b cl_new1 channels_last "$NEW"; b nchw_new1 contiguous "$NEW"; b cl_old1 channels_last "$OLD"; b nchw_old1 contiguous "$OLD"
b cl_new2 channels_last "$NEW"; b nchw_new2 contiguous "$NEW"; b cl_new3 channels_last "$NEW"; b nchw_new3 contiguous "$NEW"
timeout 150 python3 -m pytest -q -p no:cacheprovider -rs tests/test_cuda.py tests/test_gpu.py > $R/pytest_cuda_h200.txt 2>&1; t "tests rc $?"; tail -n 3 $R/pytest_cuda_h200.txt
cd $OUT && tar czf r.tgz r && rm -rf r
