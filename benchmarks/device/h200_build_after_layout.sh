#!/bin/bash
# Call 7: CUDA tests, then dhf build-index after the layout choice + warm-up (CIFAR-10 train, 4k photos), nvjpeg first-call costs.
T0=$(date +%s); t() { echo "[$(( $(date +%s) - T0 )) s] $*"; }
python3 -m pip install -q --no-index --no-deps --no-cache-dir --target /tmp/site .whlP/faiss*.whl .whlP/efficientnet_lite_pytorch*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 PYTHONPYCACHEPREFIX=/tmp/pyc
R=$OUT/r; mkdir -p $R
mkdir -p /tmp/data && tar xzf .data/cifar10-jpg.tar.gz -C /tmp/data
python3 benchmarks/make_photos.py --archive .data/cifar10-jpg.tar.gz --n 4000 --out /tmp/photos > $R/photos.log 2>&1 &
PH=$!
python3 -c "import torch, torchvision, faiss, h5py, PIL.Image, tqdm, click, efficientnet_lite_pytorch, deephash_faiss.cli, deephash_faiss.api, deephash_faiss.stream, deephash_faiss.pipeline"
t setup
timeout 120 python3 -m pytest -q -p no:cacheprovider tests/test_cuda.py > $R/test_cuda.log 2>&1; t test_cuda rc $?; tail -3 $R/test_cuda.log
timeout 150 python3 benchmarks/bench_build.py --images /tmp/data/cifar10/train --model /tmp/m32.pt --make-model --load-size 32 --device cuda --batch-size 256 --decode-kinds process --json $R/h200_cifar10_train.json > $R/cifar.log 2>&1
t cifar; tail -2 $R/cifar.log
for L in channels_last auto; do rm -rf /tmp/ix; s=$(date +%s%N); if [ $L = auto ]; then unset DHF_CUDA_LAYOUT; else export DHF_CUDA_LAYOUT=$L; fi; python3 -m deephash_faiss.cli build-index /tmp/data/cifar10/train --model /tmp/m32.pt -o /tmp/ix --device cuda --batch-size 256 > $R/cifar_$L.log 2>/dev/null; echo "cifar $L product wall $(( ($(date +%s%N) - s) / 1000000 )) ms" >> $R/cifar_$L.log; tail -3 $R/cifar_$L.log; done
unset DHF_CUDA_LAYOUT
t cifar layouts
wait $PH
timeout 150 python3 benchmarks/bench_build.py --images /tmp/photos --model /tmp/m224.pt --make-model --device cuda --decoder nvjpeg --batch-size 256 --decode-kinds process --compare-decoders 1000 --json $R/h200_photos4000.json > $R/photos_nv.log 2>&1
t photos nvjpeg; tail -2 $R/photos_nv.log
for D in pil nvjpeg pil nvjpeg; do rm -rf /tmp/ix; s=$(date +%s%N); python3 -m deephash_faiss.cli build-index /tmp/photos --model /tmp/m224.pt -o /tmp/ix --device cuda --decoder $D --batch-size 256 > $R/photos_$D.log 2>/dev/null; echo "photos $D product wall $(( ($(date +%s%N) - s) / 1000000 )) ms" >> $R/photos_$D.log; tail -2 $R/photos_$D.log; done
t photos product
python3 - > $R/nvjpeg_first.txt 2>&1 <<'P'
import glob, time, torch
from deephash_faiss.gpudecode import decode_batch, read_bytes
paths = sorted(glob.glob("/tmp/photos/**/*.jpg", recursive=True))[:768]
datas = [read_bytes(p) for p in paths]
t = time.perf_counter(); torch.zeros(1, device="cuda"); torch.cuda.synchronize(); print("cuda init", round(time.perf_counter() - t, 3))
for i, (lo, hi) in enumerate([(0, 1), (1, 2), (2, 258), (258, 514), (514, 768)]):
    t = time.perf_counter(); decode_batch(datas[lo:hi], 224, "cuda"); torch.cuda.synchronize()
    print(f"decode_batch {hi - lo} images, call {i}: {time.perf_counter() - t:.3f} s")
P
cat $R/nvjpeg_first.txt
timeout 40 python3 benchmarks/bench_first_batch.py --json $R/first_batch_dw.json --sizes 224 --steady 10 --cases dw_contiguous product_contiguous > $R/fbdw.log 2>&1; cat $R/fbdw.log
t done
cd $OUT && tar czf r.tgz r && rm -rf r; ls -la $OUT
