#!/bin/bash
# Call C: wait for the three runs, then the one-shot `dhf search` timing on the idle GPU; collect.
T0=$(date +%s); t() { echo "[$(( $(date +%s) - T0 )) s] $*"; }
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 PYTHONPYCACHEPREFIX=/tmp/pyc
while [ $(( $(date +%s) - T0 )) -lt 420 ] && pgrep -f reproduce.py > /dev/null; do sleep 5; done
t "runs done"; pgrep -af reproduce.py
R=$OUT/r; mkdir -p $R; DHF="python3 -m deephash_faiss.cli"
$DHF build-index /tmp/imgs --out /tmp/idx --device cuda -q > $R/build.log 2>&1; t "build rc $?"; tail -2 $R/build.log
$DHF info --index /tmp/idx > $R/info.txt 2>&1
timeout 150 python3 benchmarks/bench_oneshot.py --index /tmp/idx --queries /tmp/qsrc --n 1 16 64 256 --devices cpu cuda auto --rounds 2 --json $R/oneshot_search_h200.json > $R/oneshot.log 2>&1; t "oneshot rc $?"
tail -n 7 $R/oneshot.log
for f in /root/runs/*.log; do tr '\r' '\n' < $f | grep -v "batch/s" > $R/$(basename $f); done
cp -r /root/runs/repro $R/ 2>/dev/null; cp /root/runs/smi.log $R/
grep -h "train acc\|mAP" $R/*.log | tail -n 12
cd $OUT && tar czf r.tgz r && rm -rf r; ls -la $OUT
