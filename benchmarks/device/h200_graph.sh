#!/bin/bash
# (2026-12-03, tenth session; carry .whl/.) Issue 12: diag_graph.py, would a CUDA graph free the
# forward pass from the GIL (diag_runner's GIL-loaded run starved)? Lite0 at CIFAR-10's 32-px
# load size, batch 256, each layout in its own process; then the same at 224 px (photos).
source "$(dirname "$0")/setup_compiled.sh"
python3 -c "import sys; sys.path.insert(0, 'benchmarks'); import bench_build as b; b.make_model('/tmp/m32.pt', 'efficientnet_lite0', 48, 32, None); b.make_model('/tmp/m224.pt', 'efficientnet_lite0', 48, None, None)"
t setup
for m in 32 224; do for lay in contiguous channels_last; do
  timeout 90 python3 benchmarks/diag_graph.py --model /tmp/m$m.pt --layouts $lay --json $R/h200_diag_graph_${m}_$lay.json > $R/graph_${m}_$lay.log 2>&1; t "$m $lay rc $?"; cat $R/graph_${m}_$lay.log | grep -v Warning | tail -n 9
done; done
cd $OUT && tar czf r.tgz r && rm -rf r; ls -la $OUT
