#!/bin/bash
# (2026-12-06, seventeenth session; carry .whl/ + .data/.) Issue 12: CIFAR-10 train (50,000 32-px
# JPEGs) through `dhf build-index --device cuda`, Lite0, 48 bits, as a user runs it ("process":
# 16 spawned PIL decode processes, the default on >= 4 cores) against the same command with its
# decode pool forced to threads, where data.as_is_jpeg (libjpeg-turbo, PIL's pixels) decodes the
# files (stream.PROCESS_MIN_CPUS raised in the process, then the CLI's main). Alternating x4.
source "$(dirname "$0")/setup_compiled.sh"
mkdir -p /tmp/data && tar xzf .data/cifar10-jpg.tar.gz -C /tmp/data
python3 -c "import sys; sys.path.insert(0, 'benchmarks'); import bench_build as b; b.make_model('/tmp/m32.pt', 'efficientnet_lite0', 48, 32, None)"
t setup
A="build-index /tmp/data/cifar10/train --model /tmp/m32.pt -o /tmp/ix --device cuda --batch-size 256"
b() {  # name kind
  rm -rf /tmp/ix; local s=$(date +%s%N)
  if [ $2 = process ]; then timeout 90 python3 -m deephash_faiss.cli $A > $R/$1.log 2>&1
  else timeout 90 python3 -c "import sys; from deephash_faiss import stream; stream.PROCESS_MIN_CPUS = 1 << 30
from deephash_faiss.cli import main; sys.argv = ['dhf'] + '''$A'''.split(); main()" > $R/$1.log 2>&1; fi
  echo "$1 wall $(( ($(date +%s%N) - s) / 1000000 )) ms" >> $R/$1.log; t "$1"
  grep -h "indexed\|wall" $R/$1.log | tr '\r' '\n' | grep -v "it/s" | cut -c1-160
}
for i in 1 2 3 4; do b process$i process; b thread$i thread; done
python3 -m deephash_faiss.cli verify /tmp/ix > $R/verify.txt 2>&1; t "verify rc $?"
nvidia-smi --query-gpu=name --format=csv,noheader
cd $OUT && tar czf r.tgz r && rm -rf r
