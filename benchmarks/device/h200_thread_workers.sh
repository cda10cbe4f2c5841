#!/bin/bash
# (2026-12-06, nineteenth session; carry .whl/ + .data/.) Issue 12: why thread decode (the as-is
# JPEG path) starts slow on a 16-core GPU machine. (1) decode alone: 50,000 CIFAR-10 files through
# the build's DecodePool + decode_chunk in 1/2/4/8/16 threads and 16 processes (PIL), torch loaded;
# (2) `dhf build-index --device cuda` with the pool forced to threads at 4 / 8 / 16 workers (16
# traced), beside the default (16 processes), alternating x2.
# Ran on an H100 (2026-12-06 21:05 UTC; docs/scaling.md, "Thread counts"). Next (not run):
#   DECODE_ONLY=0 TRACE=0 THREADS="1 2" ROUNDS=3 bash benchmarks/device/h200_thread_workers.sh
# (on an H200 that is also the H200 goal's check: three process builds, the default)
# (one decode thread decoded alone at 20,577 img/s against ~8,300 with 4-16: builds with 1 and 2).
# Ran on an H100 (2026-12-06 23:35 UTC, twentieth session: no H200 came). THREADS_FIRST=1 runs the
# thread builds of a round before the process build (the order check):
#   DECODE_ONLY=0 TRACE=0 THREADS="1" ROUNDS=4 THREADS_FIRST=1 bash benchmarks/device/h200_thread_workers.sh
source "$(dirname "$0")/setup_compiled.sh"
mkdir -p /tmp/data && tar xzf .data/cifar10-jpg.tar.gz -C /tmp/data
python3 -c "import sys; sys.path.insert(0, 'benchmarks'); import bench_build as b; b.make_model('/tmp/m32.pt', 'efficientnet_lite0', 48, 32, None)"
t setup
# (the decode-alone part ran as an inline script on 2026-12-06; it is now benchmarks/bench_decode_threads.py,
# the same pool, chunks and files, plus one untimed read of every file first)
[ "${DECODE_ONLY:-1}" = 1 ] && python3 benchmarks/bench_decode_threads.py --images /tmp/data/cifar10/train --size 32 \
  --pools thread:1,thread:2,thread:4,thread:8,thread:16,process:16,thread:4 --json $OUT/decode_only.json 2>&1 | tee $R/decode_only.txt
t decode-only
A="build-index /tmp/data/cifar10/train --model /tmp/m32.pt -o /tmp/ix --device cuda --batch-size 256"
b() {  # name kind workers [trace]
  rm -rf /tmp/ix; local s=$(date +%s%N)
  if [ $2 = process ]; then DHF_TRACE=${4:-0} timeout 90 python3 -m deephash_faiss.cli $A > $R/$1.log 2>&1
  else DHF_TRACE=${4:-0} timeout 90 python3 -c "import sys; from deephash_faiss import stream, data; stream.PROCESS_MIN_CPUS = 1 << 30
data.default_workers = lambda: $3
from deephash_faiss.cli import main; sys.argv = ['dhf'] + '''$A'''.split(); main()" > $R/$1.log 2>&1; fi
  echo "$1 wall $(( ($(date +%s%N) - s) / 1000000 )) ms" >> $R/$1.log; t "$1"
  grep -h "indexed\|wall\|decode pool" $R/$1.log | tr '\r' '\n' | grep -v "it/s" | cut -c1-160
}
[ "${TRACE:-1}" = 1 ] && { b trace16 thread 16 1; b trace_process process 16 1; }
for i in $(seq ${ROUNDS:-2}); do
  if [ "${THREADS_FIRST:-0}" != 1 ]; then b process$i process 16; fi
  for w in ${THREADS:-4 8 16}; do b thread${w}_$i thread $w; done
  if [ "${THREADS_FIRST:-0}" = 1 ]; then b process$i process 16; fi
done
[ "${TRACE:-1}" = 1 ] && tr '\r' '\n' < $R/trace16.log | grep -v "it/s" | grep "dhf-trace" | head -30
tr '\r' '\n' < $R/thread$(echo ${THREADS:-4} | cut -d' ' -f1)_1.log | grep -o "[0-9]*/50000 \[[^]]*\]" | awk 'NR%8==1' | head -30
nvidia-smi --query-gpu=name --format=csv,noheader
cd $OUT && tar czf r.tgz r && rm -rf r
