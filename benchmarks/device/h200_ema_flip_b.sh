#!/bin/bash
# Call B (carry .whl1/ = Lite1 weights, .whl2/ = Lite2 weights), right after call A: starts three runs
# beside A's, all with --variants (last / averaged weights x plain / flip-averaged encoding):
#   paper protocol, Lite1, 48 and 128 bits, 28 epochs, --ema-epochs 2
#   cifar10-1, Lite2, 48 bits, 60 epochs, --ema-epochs 5
# then waits and collects what has finished (collect.sh); calls C, D run collect.sh again.
T0=$(date +%s); t() { echo "[$(( $(date +%s) - T0 )) s] $*"; }
python3 -m pip install -q --no-index --no-deps --no-cache-dir --target /root/site .whl1/*.whl .whl2/*.whl || exit 1
cd /root/repo && export PYTHONPATH=/root/site:/root/repo PYTHONUNBUFFERED=1 PYTHONPYCACHEPREFIX=/tmp/pyc
P="--data /root/stash/.data --dataset cifar10 --no-plots --no-timing --variants"
run() { local tag=$1; shift; setsid nohup python3 benchmarks/reproduce.py $P --out /root/runs/$tag "$@" > /root/runs/$tag.log 2>&1 < /dev/null & }
run b_l1_48 --protocol paper --bits 48 --backbone efficientnet_lite1 --epochs 28 --ema-epochs 2
run c_l1_128 --protocol paper --bits 128 --backbone efficientnet_lite1 --epochs 28 --ema-epochs 2
run d_c1_l2 --protocol cifar10-1 --bits 48 --backbone efficientnet_lite2 --epochs 60 --ema-epochs 5
t started; bash /root/repo/benchmarks/device/h200_ema_flip_collect.sh 560
