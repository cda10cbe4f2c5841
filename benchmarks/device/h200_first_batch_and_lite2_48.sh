#!/bin/bash
# Call 5: first-batch cost on CUDA (bench_first_batch), import profile, then cifar10 paper protocol lite2 48 bits.
T0=$(date +%s); t() { echo "[$(( $(date +%s) - T0 )) s] $*"; }
python3 -m pip install -q --no-index --no-deps --no-cache-dir --target /tmp/site .whlQ/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 PYTHONPYCACHEPREFIX=/tmp/pyc
R=$OUT/r; mkdir -p $R
python3 -c "import torch, torchvision, faiss, h5py, PIL.Image, tqdm, click, efficientnet_lite_pytorch, deephash_faiss.cli, deephash_faiss.api, deephash_faiss.stream, deephash_faiss.pipeline"
t setup
python3 -X importtime -c "import deephash_faiss.cli" 2> $R/importtime.txt
s=$(date +%s%N); python3 -m deephash_faiss.cli --help > /dev/null; echo "dhf --help $(( ($(date +%s%N) - s) / 1000000 )) ms" > $R/help_ms.txt
s=$(date +%s%N); python3 -c "import torch" ; echo "import torch $(( ($(date +%s%N) - s) / 1000000 )) ms" >> $R/help_ms.txt
cat $R/help_ms.txt
timeout 170 python3 benchmarks/bench_first_batch.py --json $R/first_batch_224.json --sizes 224 --steady 10 > $R/fb224.log 2>&1; t fb224 rc $?; cat $R/fb224.log
timeout 60 python3 benchmarks/bench_first_batch.py --json $R/first_batch_32.json --sizes 32 --steady 10 --cases default no_cudnn fp32 > $R/fb32.log 2>&1; t fb32 rc $?; cat $R/fb32.log
LEFT=$(( 585 - ($(date +%s) - T0) ))
t "repro budget $LEFT s"
timeout $LEFT python3 benchmarks/reproduce.py --data .data --dataset cifar10 --protocol paper --backbone efficientnet_lite2 --bits 48 --epochs 12 --no-plots --no-timing --quiet --out $R/repro > $R/repro.log 2>&1; t repro rc $?; tail -5 $R/repro.log
cd $OUT && tar czf r.tgz r && rm -rf r; ls -la $OUT
