#!/bin/bash
# (2026-12-03, eighth session; carry .whlQ/ + .data/; prepared, not run.) Issue 13's cifar10-1 recipe
# (Lite2, 48 bits, CutMix p = 0.5, 100 epochs: seeds 0 / 1 gave 0.8546 / 0.8410 with flip averaging)
# plus random erasing (--erase-prob 0.25, train.erase_batch), seeds 0 and 1 side by side on the one
# GPU, each scored with and without flip averaging (--variants); collected by h200_ema_flip_collect.sh.
# (Ninth session, 2026-12-03, before it ran: RUNS from the environment; it ran with seeds 0, 1, 2.)
EPOCHS=100 EXTRA="--erase-prob 0.25" RUNS=${RUNS:-"m_c1_erase_s0:0 n_c1_erase_s1:1"} LIMIT=${LIMIT:-560} \
    exec bash "$(dirname "$0")/h200_c1_cutmix150_seeds.sh"
