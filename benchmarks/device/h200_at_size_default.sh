#!/bin/bash
# (2026-12-06, twentieth session; carry .whl/ + .data/.) Issue 12: the decode pool's new default
# for images already at the load size (stream.decode_pool_plan: one as-is thread instead of 16
# PIL processes). (1) bench_build.py on CIFAR-10 train through the product (decode alone, model
# alone, `dhf build-index` wall), (2) `dhf build-index` as shipped against the same command with
# the old choice forced (data.at_load_size -> False: 16 processes), alternating, the order
# swapped each round.
source "$(dirname "$0")/setup_compiled.sh"
mkdir -p /tmp/data && tar xzf .data/cifar10-jpg.tar.gz -C /tmp/data
python3 -c "import sys; sys.path.insert(0, 'benchmarks'); import bench_build as b; b.make_model('/tmp/m32.pt', 'efficientnet_lite0', 48, 32, None)"
t setup
timeout 200 python3 benchmarks/bench_build.py --images /tmp/data/cifar10/train --model /tmp/m32.pt --load-size 32 \
  --device cuda --batch-size 256 --decode-kinds thread,process --json $OUT/cifar10_train_at_size.json > $R/bench_build.log 2>&1
t bench_build rc $?; tail -3 $R/bench_build.log
A="build-index /tmp/data/cifar10/train --model /tmp/m32.pt -o /tmp/ix --device cuda --batch-size 256"
b() {  # name default|processes
  rm -rf /tmp/ix; local s=$(date +%s%N)
  if [ $2 = default ]; then DHF_TRACE=1 timeout 90 python3 -m deephash_faiss.cli $A > $R/$1.log 2>&1
  else DHF_TRACE=1 timeout 90 python3 -c "import sys; from deephash_faiss import data; data.at_load_size = lambda *a, **k: False
from deephash_faiss.cli import main; sys.argv = ['dhf'] + '''$A'''.split(); main()" > $R/$1.log 2>&1; fi
  echo "$1 wall $(( ($(date +%s%N) - s) / 1000000 )) ms" >> $R/$1.log; t "$1"
  tr '\r' '\n' < $R/$1.log | grep -h "indexed\|wall\|decode pool" | grep -v "it/s" | cut -c1-160
}
for i in $(seq ${ROUNDS:-3}); do
  if [ $((i % 2)) = 1 ]; then b default$i default; b processes$i processes; else b processes$i processes; b default$i default; fi
done
nvidia-smi --query-gpu=name --format=csv,noheader
cd $OUT && tar czf r.tgz r && rm -rf r
