#!/bin/bash
# (Prepared 2026-12-03, eighth session, not run: no device time left; carry .whl/ + .data/.)
# Issue 12: what bounds the nvjpeg decode stage (8,235 img/s fed by 16 reading threads against
# 13,000-15,000 for decode_batch alone): benchmarks/diag_decode_threads.py on 30,000 photos,
# bytecode compiled first (the host runs with PYTHONDONTWRITEBYTECODE=1).
source "$(dirname "$0")/setup_compiled.sh"  # the set-up lines it ran, moved there unchanged
python3 benchmarks/make_photos.py --archive .data/cifar10-jpg.tar.gz --n 30000 --out /tmp/photos > $R/photos.log 2>&1; t setup
for i in 1 2; do timeout 200 python3 benchmarks/diag_decode_threads.py --photos /tmp/photos --json $R/h200_decode_threads_$i.json; t "diag $i"; done
cd $OUT && tar czf r.tgz r && rm -rf r; ls -la $OUT
