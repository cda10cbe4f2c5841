#!/bin/bash
# (2026-12-03, twelfth session; carry .whl/ + .data/.; needs LocalExecutor.start_pool, which was not landed)
# Issue 12: h200_early_pool.sh's builds were
# slower (8.8-10.8 s) than h200_early.sh's (8.1-8.7 s) on another machine. A/B in one call: the
# decode processes booted while the key is computed (LocalExecutor.start_pool, "pool") against the
# same code with start_pool patched to nothing ("inline": the pool starts in the encoder, as in
# h200_early.sh), alternating x4 on CIFAR-10 train.
COMPILE_EXTRA="$PWD/benchmarks" source "$(dirname "$0")/setup_compiled.sh"
mkdir -p /tmp/data && tar xzf .data/cifar10-jpg.tar.gz -C /tmp/data
python3 -c "import sys; sys.path.insert(0, 'benchmarks'); import bench_build as b; b.make_model('/tmp/m32.pt', 'efficientnet_lite0', 48, 32, None)"
t setup
POOL='from deephash_faiss.cli import main; main()'
INLINE='import deephash_faiss.pipeline as P
P.LocalExecutor.start_pool = lambda self, *a: None
from deephash_faiss.cli import main; main()'
b() {  # name code
  rm -rf /tmp/ix; local s=$(date +%s%N)
  DHF_TRACE=1 timeout 90 python3 -c "$2" build-index /tmp/data/cifar10/train --model /tmp/m32.pt -o /tmp/ix --device cuda --batch-size 256 > $R/$1.log 2>&1
  echo "$1 wall $(( ($(date +%s%N) - s) / 1000000 )) ms" >> $R/$1.log; t "$1"
  grep -h "indexed\|time:\|wall" $R/$1.log | tr '\r' '\n' | grep -v "it/s" | cut -c1-160
}
for i in 1 2 3 4; do b inline$i "$INLINE"; b pool$i "$POOL"; done
for f in inline4 pool4; do echo "== $f"; tr '\r' '\n' < $R/$f.log | sed 's/\[dhf-trace/\n[dhf-trace/g' | grep "^\[dhf-trace" | grep -v "batch [12] " | cut -c1-110; done
cd $OUT && tar czf r.tgz r && rm -rf r
