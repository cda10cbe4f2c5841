#!/bin/bash
# (2026-12-03, thirteenth session; carry .whl/ + .data/ + .abold/ = deephash_faiss at 9e5d8aa.) Issue 12:
# the build now appends each batch to its shard's HDF5 file as the batch comes back
# (store.ShardFile, pipeline._PartWriter) instead of writing the whole shard after the last batch.
# The CUDA tests; then CIFAR-10 train through `dhf build-index` as a user runs it, this tree against
# 9e5d8aa alternating x5 in the same call, every run traced; bench_build.py last.
# QUICK=1 (2026-12-06, little device time left): only the alternating builds and verify.
COMPILE_EXTRA="$PWD/tests $PWD/benchmarks $PWD/.abold" source "$(dirname "$0")/setup_compiled.sh"
mkdir -p /tmp/data && tar xzf .data/cifar10-jpg.tar.gz -C /tmp/data
python3 -c "import sys; sys.path.insert(0, 'benchmarks'); import bench_build as b; b.make_model('/tmp/m32.pt', 'efficientnet_lite0', 48, 32, None)"
t setup
[ -z "$QUICK" ] && timeout 150 python3 -m pytest -q -p no:cacheprovider -rs tests/test_cuda.py tests/test_gpu.py > $R/pytest_cuda_h200.txt 2>&1; t "tests rc $?"; tail -n 3 $R/pytest_cuda_h200.txt
b() {  # name pythonpath
  rm -rf /tmp/ix; local s=$(date +%s%N)
  DHF_TRACE=1 PYTHONPATH=$2 timeout 90 python3 -m deephash_faiss.cli build-index /tmp/data/cifar10/train --model /tmp/m32.pt -o /tmp/ix --device cuda --batch-size 256 > $R/$1.log 2>&1
  echo "$1 wall $(( ($(date +%s%N) - s) / 1000000 )) ms" >> $R/$1.log; t "$1"
  grep -h "indexed\|wall\|last batch back\|shard 0 written\|finalized" $R/$1.log | tr '\r' '\n' | grep -v "it/s" | cut -c1-160
}
NEW=/root/site:$PWD; OLD=$PWD/.abold:/root/site
for i in 1 2 3 4 5; do b new$i $NEW; b old$i $OLD; done
PYTHONPATH=$NEW python3 -m deephash_faiss.cli verify /tmp/ix > $R/verify.txt 2>&1; t "verify rc $?"
[ -z "$QUICK" ] && timeout 150 python3 benchmarks/bench_build.py --images /tmp/data/cifar10/train --model /tmp/m32.pt --load-size 32 --device cuda --batch-size 256 --decode-kinds process --json $R/h200_cifar10_train_stream_write.json > $R/bench.log 2>&1; t "bench rc $?"
tail -n 1 $R/bench.log | cut -c1-1500
cd $OUT && tar czf r.tgz r && rm -rf r
