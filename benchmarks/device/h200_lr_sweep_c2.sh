#!/bin/bash
# Call C2: wait for call A2's paper-protocol runs, collect logs and JSON.
T0=$(date +%s); t() { echo "[$(( $(date +%s) - T0 )) s] $*"; }
while [ $(( $(date +%s) - T0 )) -lt ${WAIT:-500} ] && pgrep -f reproduce.py > /dev/null; do sleep 5; done
t "waited"; pgrep -af reproduce.py | cut -c1-150
R=$OUT/r; mkdir -p $R
for f in /root/runs/*.log; do tr '\r' '\n' < $f | grep -v "batch/s" > $R/$(basename $f); done
for d in /root/runs/*/; do cp $d/*.json $R/$(basename $d).json 2>/dev/null; done
grep -h "query-set accuracy\|BCS" $R/*.log | tail -n 12
cd $OUT && tar czf r.tgz r && rm -rf r; ls -la $OUT
