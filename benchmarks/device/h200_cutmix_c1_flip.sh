#!/bin/bash
# (2026-12-02, fourth session, last 5 device minutes; carry .whlQ/ = efficientnet-lite-pytorch + Lite2
# weights, .data/) cifar10-1, Lite2, 48 bits, 50 epochs with CutMix p=0.5, flip-averaged encoding: does
# mixing close the gap to 0.85 that 60 epochs without it (0.836 with flip averaging) left?
python3 -m pip install -q --no-index --no-deps --no-cache-dir --target /tmp/site .whlQ/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1
timeout 275 python3 benchmarks/reproduce.py --data .data --dataset cifar10 --protocol cifar10-1 --bits 48 \
  --backbone efficientnet_lite2 --epochs 50 --mix cutmix --flip-average --no-plots --no-timing --quiet \
  --out $OUT 2>&1 | tr '\r' '\n' | grep -v "batch/s" | tee $OUT/log.txt | tail -n 8
