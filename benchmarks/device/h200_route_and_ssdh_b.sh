#!/bin/bash
# Call B, right after A (carry .whl2/ = Lite2 weights, .seed/ = the real-statistics seed's codes.npz).
# GPU alone first: the Searcher on real-statistics codes grown to 1e8 rows with A's routing; then three
# cifar10-1 runs (Lite2, 48 bits, CutMix, flip-averaged encoding) start in the background, collected
# by h200_ema_flip_collect.sh in the next calls:
#   e_c1_ssdh50   50 epochs + the SSDH code terms (binary 1, balance 1): against the 0.8434 run
#   f_c1_100      100 epochs
#   g_c1_ssdh100  100 epochs + the SSDH code terms
T0=$(date +%s); t() { echo "[$(( $(date +%s) - T0 )) s] $*"; }
python3 -m pip install -q --no-index --no-deps --no-cache-dir --target /root/site .whl2/*.whl || exit 1
cp /root/stash/routing.json deephash_faiss/routing.json
export PYTHONPATH=/root/site:$PWD PYTHONUNBUFFERED=1 PYTHONPYCACHEPREFIX=/tmp/pyc
R=$OUT/r; mkdir -p $R
timeout 300 python3 benchmarks/bench_searcher_cuda.py --cases realgen --source .seed --n 1e8 \
  --json $R/searcher_cuda_h200_realgen1e8.json > $R/sc1e8.log 2>&1; t "1e8 rc $?"
rm -rf /root/repo && cp -r . /root/repo && cd /root/repo
export PYTHONPATH=/root/site:/root/repo
P="--data /root/stash/.data --dataset cifar10 --protocol cifar10-1 --bits 48 --backbone efficientnet_lite2 --mix cutmix --flip-average --no-plots --no-timing"
run() { local tag=$1; shift; setsid nohup python3 benchmarks/reproduce.py $P --out /root/runs/$tag "$@" > /root/runs/$tag.log 2>&1 < /dev/null & }
run e_c1_ssdh50 --epochs 50 --binary-weight 1 --balance-weight 1
run f_c1_100 --epochs 100
run g_c1_ssdh100 --epochs 100 --binary-weight 1 --balance-weight 1
sleep 15; t started; tail -n 2 $R/*.log | cut -c1-400; nvidia-smi --query-gpu=memory.used,utilization.gpu --format=csv
cd $OUT && tar czf r.tgz r && rm -rf r; ls -la $OUT
