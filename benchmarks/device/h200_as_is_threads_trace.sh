#!/bin/bash
# (2026-12-06, eighteenth session; carry .whl/ + .data/.) Why a CIFAR-10 build with thread decode
# (the as-is JPEG path) runs at ~2,500 img/s for its first ~15,000 images on a 16-core GPU machine
# (h200_as_is_threads.sh): one thread build and one process build with DHF_TRACE=1.
source "$(dirname "$0")/setup_compiled.sh"
mkdir -p /tmp/data && tar xzf .data/cifar10-jpg.tar.gz -C /tmp/data
python3 -c "import sys; sys.path.insert(0, 'benchmarks'); import bench_build as b; b.make_model('/tmp/m32.pt', 'efficientnet_lite0', 48, 32, None)"
t setup
A="build-index /tmp/data/cifar10/train --model /tmp/m32.pt -o /tmp/ix --device cuda --batch-size 256"
export DHF_TRACE=1
rm -rf /tmp/ix; timeout 60 python3 -c "import sys; from deephash_faiss import stream; stream.PROCESS_MIN_CPUS = 1 << 30
from deephash_faiss.cli import main; sys.argv = ['dhf'] + '''$A'''.split(); main()" 2>&1 | tr '\r' '\n' | grep -v "it/s" > $R/thread_trace.log; t thread
rm -rf /tmp/ix; timeout 60 python3 -m deephash_faiss.cli $A 2>&1 | tr '\r' '\n' | grep -v "it/s" > $R/process_trace.log; t process
grep -v "img/s\]" $R/thread_trace.log | grep -v "batch [0-9]* decoded\|batch [0-9]* queued" | head -40
grep -c "queued" $R/thread_trace.log
nvidia-smi --query-gpu=name --format=csv,noheader
