#!/bin/bash
# (2026-12-03, seventh session; carry .whlQ/ = efficientnet-lite-pytorch + Lite2 weights, .data/ =
# the CIFAR-10 archive). Issue 13's cifar10-1 recipe (Lite2, 48 bits, CutMix p = 0.5) for 150
# epochs, seeds 0, 1 and 2 side by side on the one GPU, each scored with and without flip averaging
# (--variants); started in the background and collected by h200_ema_flip_collect.sh across calls.
# As it ran, with since then (2026-12-03, eighth session): EPOCHS, EXTRA (more reproduce.py flags),
# RUNS ("tag:seed ...") and LIMIT from the environment, their defaults being that run's values
# (h200_c1_cutmix_erase.sh uses them).
T0=$(date +%s)
python3 -m pip install -q --no-index --no-deps --no-cache-dir --target /root/site .whlQ/*.whl || exit 1
rm -rf /root/runs /root/repo && mkdir -p /root/stash /root/runs && cp -r .data /root/stash/ && cp -r "$PWD" /root/repo
echo "[$(( $(date +%s) - T0 )) s] setup"
cd /root/repo && export PYTHONPATH=/root/site:/root/repo PYTHONUNBUFFERED=1 PYTHONPYCACHEPREFIX=/tmp/pyc
P="--data /root/stash/.data --dataset cifar10 --protocol cifar10-1 --bits 48 --backbone efficientnet_lite2 --mix cutmix --epochs ${EPOCHS:-150} ${EXTRA:-} --variants --no-plots --no-timing"
run() { local tag=$1; shift; setsid nohup python3 benchmarks/reproduce.py $P --out /root/runs/$tag "$@" > /root/runs/$tag.log 2>&1 < /dev/null & }
for r in ${RUNS:-j_c1_150_s0:0 k_c1_150_s1:1 l_c1_150_s2:2}; do run ${r%%:*} --seed ${r##*:}; done
bash /root/repo/benchmarks/device/h200_ema_flip_collect.sh $(( ${LIMIT:-570} - ($(date +%s) - T0) ))
