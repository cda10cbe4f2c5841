#!/bin/bash
# (Prepared 2026-12-03 for the next session with device time; carry .whl/ + .data/.) Issue 12 at
# scale: 200,000 photo-sized JPEGs (~9.4 GB), where `--decoder auto` picks nvjpeg and the layout is
# NHWC: bench_build.py with nvjpeg (decode alone, model alone, the command) and the command with
# --decoder pil. Rates after the first batch are what the 1e9 projection in docs/scaling.md rests on.
N=200000 AUTO=0 DIAG=0 exec bash "$(dirname "$0")/h200_photos30k.sh"
