#!/bin/bash
# Wait up to $1 s (from now) or until every run has its JSON, then copy the finished JSON, filtered
# logs and the seed export under $OUT (r.tgz; the seed's arrays as separate files).
T0=$(date +%s); LIM=${1:-560}
done_all() { for d in /root/runs/*.log; do n=${d%.log}; ls $n/*.json >/dev/null 2>&1 || return 1; done; return 0; }
while [ $(( $(date +%s) - T0 )) -lt $LIM ] && ! done_all; do sleep 5; done
echo "[$(( $(date +%s) - T0 )) s] collecting"
R=$OUT/r; mkdir -p $R
for f in /root/runs/*.log; do tr '\r' '\n' < $f | grep -v "batch/s\|q/s" > $R/$(basename $f);
  echo "$(basename $f): $(grep '^epoch' $R/$(basename $f) | tail -n 1)"; done
for d in /root/runs/*/; do for j in $d*.json; do [ -f "$j" ] && cp "$j" $R/$(basename $d)__$(basename $j); done; done
grep -h "^variant\|mAP@\|mAP(full)\|accuracy" $R/*.log | cut -c1-400
(cd $OUT && tar czf r.tgz r && rm -rf r)
if [ -f /root/runs/seed/codes.npz ]; then cp /root/runs/seed/codes.npz /root/runs/seed/feats_*.npy $OUT/; fi
ls -la $OUT
