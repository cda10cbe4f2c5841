#!/bin/bash
# (2026-12-03, seventh session; carry .whl/ + .data/ as h200_photos30k.sh.) Issue 12, after
# gpudecode.square_batch became two matrix products (torch's antialiased interpolate cost seconds
# at its first call): the resize's first call old vs new (diag_startup.py), then on 30,000 photos
# bench_build.py with nvjpeg (decode alone, model alone, the command), the command with --decoder
# pil and auto, and the nvjpeg build through the API with 4 file-reading threads instead of 16.
T0=$(date +%s); t() { echo "[$(( $(date +%s) - T0 )) s] $*"; }
python3 -m pip install -q --no-index --no-deps --no-cache-dir --target /root/site .whl/*.whl || exit 1
export PYTHONPATH=/root/site:$PWD PYTHONUNBUFFERED=1 PYTHONPYCACHEPREFIX=/tmp/pyc
R=$OUT/r; mkdir -p $R
python3 benchmarks/make_photos.py --archive .data/cifar10-jpg.tar.gz --n 30000 --out /tmp/photos > $R/photos.log 2>&1; t setup
timeout 60 python3 benchmarks/diag_startup.py --photos /tmp/photos --no-import-profile --cases resize_first_interpolate_aa,resize_first_matmul,product_decode --json $R/diag_resize.json > $R/diag.log 2>&1; t "diag rc $?"
timeout 150 python3 benchmarks/bench_build.py --images /tmp/photos --model /tmp/m224.pt --make-model --device cuda --decoder nvjpeg --batch-size 256 --decode-kinds process --model-n 4096 --json $R/h200_photos30k_matmul_resize.json > $R/bench.log 2>&1; t "bench rc $?"
for D in pil auto; do rm -rf /tmp/ix; s=$(date +%s%N); timeout 60 python3 -m deephash_faiss.cli build-index /tmp/photos --model /tmp/m224.pt -o /tmp/ix --device cuda --decoder $D --batch-size 256 > $R/photos_$D.log 2>/dev/null; echo "photos30k $D product wall $(( ($(date +%s%N) - s) / 1000000 )) ms" >> $R/photos_$D.log; t "$D"; done
rm -rf /tmp/ix; s=$(date +%s%N); timeout 60 python3 -c "
from deephash_faiss import api
r = api.build_index('/tmp/photos', '/tmp/ix', '/tmp/m224.pt', batch_size=256, device='cuda', progress=False, decoder='nvjpeg', decode_workers=4)
print('indexed', r.count, 'phases', {k: round(v, 2) for k, v in r.phases.items()})" > $R/photos_nv4.log 2>&1; echo "photos30k nvjpeg 4 readers (API) wall $(( ($(date +%s%N) - s) / 1000000 )) ms" >> $R/photos_nv4.log; t nv4
tail -n 3 $R/*.log | cut -c1-900
cd $OUT && tar czf r.tgz r && rm -rf r; ls -la $OUT
