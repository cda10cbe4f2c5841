#!/bin/bash
# Call E, right after D (nothing carried: A-B's wheels and data are still on the machine). The
# cifar10-1 run that met 0.85 (Lite2, 48 bits, CutMix, 100 epochs), again with --variants (scored with
# and without flip averaging), seeds 0 and 1 side by side; collected in this call.
rm -rf /root/runs && mkdir -p /root/runs && cd /root/repo && export PYTHONPATH=/root/site:/root/repo PYTHONUNBUFFERED=1 PYTHONPYCACHEPREFIX=/tmp/pyc
P="--data /root/stash/.data --dataset cifar10 --protocol cifar10-1 --bits 48 --backbone efficientnet_lite2 --mix cutmix --epochs 100 --variants --no-plots --no-timing"
run() { local tag=$1; shift; setsid nohup python3 benchmarks/reproduce.py $P --out /root/runs/$tag "$@" > /root/runs/$tag.log 2>&1 < /dev/null & }
run h_c1_100_s0 --seed 0
run i_c1_100_s1 --seed 1
bash /root/repo/benchmarks/device/h200_ema_flip_collect.sh 570
