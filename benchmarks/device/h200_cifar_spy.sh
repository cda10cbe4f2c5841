#!/bin/bash
# (2026-12-03, tenth session; carry .whl/ + .whlS/ (py-spy) + .data/.) Issue 12: what the CIFAR-10
# build does after its first batch. Every batch is decoded (or in flight) by then (trace: "196
# batches decoded or in flight" at 1.2-1.4 s), yet the encode phase runs at 8,880-9,390 img/s
# against the CUDA runner alone at 11,412 (diag_runner.py). One plain build, then the same build
# under py-spy --gil (who holds the GIL) and --idle --threads (where each thread waits).
source "$(dirname "$0")/setup_compiled.sh"
python3 -m pip install -q --no-index --no-deps --no-cache-dir --target /root/site .whlS/*.whl; export PATH=/root/site/bin:$PATH
mkdir -p /tmp/data && tar xzf .data/cifar10-jpg.tar.gz -C /tmp/data
python3 -c "import sys; sys.path.insert(0, 'benchmarks'); import bench_build as b; b.make_model('/tmp/m32.pt', 'efficientnet_lite0', 48, 32, None)"
t setup
B="-m deephash_faiss.cli build-index /tmp/data/cifar10/train --model /tmp/m32.pt -o /tmp/ix --device cuda --batch-size 256"
rm -rf /tmp/ix; s=$(date +%s%N); DHF_TRACE=1 timeout 60 python3 $B > $R/plain.log 2>&1; echo "wall $(( ($(date +%s%N) - s) / 1000000 )) ms" >> $R/plain.log; t plain; grep -h "indexed\|time:\|wall" $R/plain.log
rm -rf /tmp/ix; timeout 90 py-spy record --gil --threads -r 500 -f raw -o $R/spy_gil_cifar.txt -- python3 $B --quiet > $R/spy_gil.log 2>&1; t "spy gil rc $?"; grep -h "indexed\|time:" $R/spy_gil.log
rm -rf /tmp/ix; timeout 90 py-spy record --idle --threads -r 250 -f raw -o $R/spy_idle_cifar.txt -- python3 $B --quiet > $R/spy_idle.log 2>&1; t "spy idle rc $?"; grep -h "indexed\|time:" $R/spy_idle.log
ls -la $R; cd $OUT && tar czf r.tgz r && rm -rf r; ls -la $OUT
