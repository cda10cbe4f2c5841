#!/bin/bash
# (2026-12-03, eighth session; carry .whlQ/ + .data/.) Issue 13's cifar10-1 recipe (Lite2, 48 bits,
# CutMix p = 0.5, 100 epochs: seeds 0 / 1 gave 0.8546 / 0.8410 with flip averaging) plus random
# erasing (--erase-prob 0.25, train.erase_batch), seeds 0 and 1 side by side on the one GPU, each
# scored with and without flip averaging (--variants); collected by h200_ema_flip_collect.sh.
T0=$(date +%s)
python3 -m pip install -q --no-index --no-deps --no-cache-dir --target /root/site .whlQ/*.whl || exit 1
rm -rf /root/runs /root/repo && mkdir -p /root/stash /root/runs && cp -r .data /root/stash/ && cp -r "$PWD" /root/repo
echo "[$(( $(date +%s) - T0 )) s] setup"
cd /root/repo && export PYTHONPATH=/root/site:/root/repo PYTHONUNBUFFERED=1 PYTHONPYCACHEPREFIX=/tmp/pyc
P="--data /root/stash/.data --dataset cifar10 --protocol cifar10-1 --bits 48 --backbone efficientnet_lite2 --mix cutmix --erase-prob 0.25 --epochs 100 --variants --no-plots --no-timing"
run() { local tag=$1; shift; setsid nohup python3 benchmarks/reproduce.py $P --out /root/runs/$tag "$@" > /root/runs/$tag.log 2>&1 < /dev/null & }
run m_c1_erase_s0 --seed 0
run n_c1_erase_s1 --seed 1
bash /root/repo/benchmarks/device/h200_ema_flip_collect.sh $(( ${LIMIT:-560} - ($(date +%s) - T0) ))
