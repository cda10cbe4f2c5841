#!/bin/bash
# Call 6: convolution layouts on CUDA (first forward + steady), then dhf build-index per layout on CIFAR-10 train and 4k photos.
T0=$(date +%s); t() { echo "[$(( $(date +%s) - T0 )) s] $*"; }
python3 -m pip install -q --no-index --no-deps --no-cache-dir --target /tmp/site .whlP/faiss*.whl .whlP/efficientnet_lite_pytorch*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 PYTHONPYCACHEPREFIX=/tmp/pyc
R=$OUT/r; mkdir -p $R
mkdir -p /tmp/data && tar xzf .data/cifar10-jpg.tar.gz -C /tmp/data
python3 benchmarks/make_photos.py --archive .data/cifar10-jpg.tar.gz --n 4000 --out /tmp/photos > $R/photos.log 2>&1 &
PH=$!
python3 -c "import torch, torchvision, faiss, h5py, PIL.Image, tqdm, click, efficientnet_lite_pytorch, deephash_faiss.cli, deephash_faiss.api, deephash_faiss.stream, deephash_faiss.pipeline"
t setup
timeout 120 python3 benchmarks/bench_first_batch.py --json $R/first_batch_layouts_224.json --sizes 224 --steady 10 --cases product_channels_last product_contiguous product_dw_contiguous dw_native deterministic > $R/fbL.log 2>&1; t fbL rc $?; cat $R/fbL.log
timeout 60 python3 benchmarks/bench_first_batch.py --json $R/first_batch_layouts_224_again.json --sizes 224 --steady 10 --cases product_dw_contiguous product_channels_last > $R/fbL2.log 2>&1; t fbL2 rc $?; cat $R/fbL2.log
timeout 150 python3 benchmarks/bench_build.py --images /tmp/data/cifar10/train --model /tmp/m32.pt --make-model --load-size 32 --device cuda --batch-size 256 --decode-kinds process --json $R/h200_cifar10_train.json > $R/cifar.log 2>&1
t cifar; tail -2 $R/cifar.log
for L in channels_last contiguous dw_contiguous; do rm -rf /tmp/ix; s=$(date +%s%N); DHF_CUDA_LAYOUT=$L python3 -m deephash_faiss.cli build-index /tmp/data/cifar10/train --model /tmp/m32.pt -o /tmp/ix --device cuda --batch-size 256 > $R/cifar_$L.log 2>/dev/null; echo "cifar $L product wall $(( ($(date +%s%N) - s) / 1000000 )) ms" >> $R/cifar_$L.log; tail -3 $R/cifar_$L.log; done
t cifar layouts
wait $PH
timeout 150 python3 benchmarks/bench_build.py --images /tmp/photos --model /tmp/m224.pt --make-model --device cuda --decoder nvjpeg --batch-size 256 --decode-kinds process --json $R/h200_photos4000.json > $R/photos_nv.log 2>&1
t photos nvjpeg; tail -2 $R/photos_nv.log
for L in channels_last dw_contiguous; do for D in pil nvjpeg; do rm -rf /tmp/ix; s=$(date +%s%N); DHF_CUDA_LAYOUT=$L python3 -m deephash_faiss.cli build-index /tmp/photos --model /tmp/m224.pt -o /tmp/ix --device cuda --decoder $D --batch-size 256 > $R/photos_${D}_$L.log 2>/dev/null; echo "photos $D $L product wall $(( ($(date +%s%N) - s) / 1000000 )) ms" >> $R/photos_${D}_$L.log; tail -3 $R/photos_${D}_$L.log; done; done
t done
cd $OUT && tar czf r.tgz r && rm -rf r; ls -la $OUT
