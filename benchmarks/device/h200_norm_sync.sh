#!/bin/bash
# (2026-12-03, tenth session; carry .whl/ + .data/.) Issue 12: HashNet.preprocess made its mean
# and std from lists on every batch, a blocking host-to-device copy that synchronised the GPU's
# stream (py-spy: the CIFAR build's main thread waited there 12 % of its encode time), so the
# CUDA encoder could not queue a batch ahead. Now buffers on the model's device. CIFAR-10 train
# through `dhf build-index`, the new code and the old preprocess (patched back) alternating, x2.
source "$(dirname "$0")/setup_compiled.sh"
mkdir -p /tmp/data && tar xzf .data/cifar10-jpg.tar.gz -C /tmp/data
python3 -c "import sys; sys.path.insert(0, 'benchmarks'); import bench_build as b; b.make_model('/tmp/m32.pt', 'efficientnet_lite0', 48, 32, None)"
t setup
OLD='import torch, deephash_faiss.model as M
def pre(self, images):
    x = images.permute(0, 3, 1, 2).float().div_(255.0)
    size = self.config.input_size
    if x.shape[-1] != size or x.shape[-2] != size:
        x = torch.nn.functional.interpolate(x, size=(size, size), mode="bilinear", align_corners=False, antialias=x.shape[-1] > size)
    mean = torch.tensor(self.config.mean, device=x.device).view(1, 3, 1, 1)
    std = torch.tensor(self.config.std, device=x.device).view(1, 3, 1, 1)
    return (x - mean) / std
M.HashNet.preprocess = pre
from deephash_faiss.cli import main; main()'
NEW='from deephash_faiss.cli import main; main()'
b() {  # name code
  rm -rf /tmp/ix; local s=$(date +%s%N)
  timeout 60 python3 -c "$2" build-index /tmp/data/cifar10/train --model /tmp/m32.pt -o /tmp/ix --device cuda --batch-size 256 > $R/$1.log 2>&1
  echo "$1 wall $(( ($(date +%s%N) - s) / 1000000 )) ms" >> $R/$1.log; t "$1"; grep -h "indexed\|time:\|wall" $R/$1.log | tr '\r' '\n' | grep -v "it/s"
}
b new1 "$NEW"; b old1 "$OLD"; b new2 "$NEW"; b old2 "$OLD"; b new3 "$NEW"; b old3 "$OLD"
cd $OUT && tar czf r.tgz r && rm -rf r
