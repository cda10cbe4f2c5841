#!/bin/bash
# (2026-12-03, twelfth session; carry .whl/ + .data/.; as it ran, with a product change that was not
# landed: LocalExecutor.start_pool, see docs/scaling.md "Hybrid layout") Issue 12, after h200_early.sh: the decode
# processes now boot while the build computes its job key (LocalExecutor.start_pool), and their
# first task imports PIL. The CUDA tests; CIFAR-10 train through `dhf build-index` (auto) x5, full
# trace of the last; bench_build.py.
COMPILE_EXTRA="$PWD/tests $PWD/benchmarks" source "$(dirname "$0")/setup_compiled.sh"
mkdir -p /tmp/data && tar xzf .data/cifar10-jpg.tar.gz -C /tmp/data
python3 -c "import sys; sys.path.insert(0, 'benchmarks'); import bench_build as b; b.make_model('/tmp/m32.pt', 'efficientnet_lite0', 48, 32, None)"
t setup
timeout 150 python3 -m pytest -q -p no:cacheprovider -rs tests/test_cuda.py tests/test_gpu.py > $R/pytest_cuda_h200.txt 2>&1; t "tests rc $?"; tail -n 3 $R/pytest_cuda_h200.txt
b() {  # name layout
  rm -rf /tmp/ix; local s=$(date +%s%N)
  DHF_TRACE=1 DHF_CUDA_LAYOUT=$2 timeout 90 python3 -m deephash_faiss.cli build-index /tmp/data/cifar10/train --model /tmp/m32.pt -o /tmp/ix --device cuda --batch-size 256 > $R/$1.log 2>&1
  echo "$1 wall $(( ($(date +%s%N) - s) / 1000000 )) ms" >> $R/$1.log; t "$1"
  grep -h "indexed\|time:\|wall" $R/$1.log | tr '\r' '\n' | grep -v "it/s" | cut -c1-160
}
b auto1 ""; b auto2 ""; b auto3 ""; b auto4 ""; b auto5 ""
grep -h "dhf-trace" $R/auto5.log | tr '\r' '\n' | grep "dhf-trace" | grep -v "batch [12] " | cut -c1-120
python3 -m deephash_faiss.cli verify /tmp/ix > $R/verify.txt 2>&1; t "verify rc $?"
timeout 150 python3 benchmarks/bench_build.py --images /tmp/data/cifar10/train --model /tmp/m32.pt --load-size 32 --device cuda --batch-size 256 --decode-kinds process --json $R/h200_cifar10_train_early_pool.json > $R/bench.log 2>&1; t "bench rc $?"
tail -n 1 $R/bench.log | cut -c1-1500
cd $OUT && tar czf r.tgz r && rm -rf r
