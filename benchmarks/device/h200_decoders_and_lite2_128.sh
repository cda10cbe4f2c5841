#!/bin/bash
# Call 8: PIL vs nvjpeg agreement with ImageNet weights (lite2, 1,000 photos), then cifar10 paper protocol lite2 128 bits.
T0=$(date +%s); t() { echo "[$(( $(date +%s) - T0 )) s] $*"; }
python3 -m pip install -q --no-index --no-deps --no-cache-dir --target /tmp/site .whlQ/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 PYTHONPYCACHEPREFIX=/tmp/pyc
R=$OUT/r; mkdir -p $R
python3 benchmarks/make_photos.py --archive .data/cifar10-jpg.tar.gz --n 1000 --out /tmp/photos > $R/photos.log 2>&1
t setup
timeout 100 python3 - $R/decoder_agreement.json > $R/agree.log 2>&1 <<'P'
import glob, json, sys, torch
sys.path.insert(0, "benchmarks")
from bench_build import compare_decoders
from deephash_faiss.model import build_model
paths = sorted(glob.glob("/tmp/photos/**/*.jpg", recursive=True))[:1000]
dev = torch.device("cuda")
out = {}
for bb in ["efficientnet_lite2"]:
    m = build_model(bb, 48, ["a", "b"], weights="default", seed=0).to(dev)
    out[bb] = compare_decoders(m, paths, dev, 256)
    print(bb, out[bb], flush=True)
json.dump(out, open(sys.argv[1], "w"), indent=1)
P
t agree rc $?; cat $R/agree.log
LEFT=$(( 440 - ($(date +%s) - T0) ))
t "repro budget $LEFT s"
timeout $LEFT python3 benchmarks/reproduce.py --data .data --dataset cifar10 --protocol paper --backbone efficientnet_lite2 --bits 128 --epochs 10 --no-plots --no-timing --quiet --out $R/repro > $R/repro.log 2>&1; t repro rc $?; tail -4 $R/repro.log
cd $OUT && tar czf r.tgz r && rm -rf r; ls -la $OUT
