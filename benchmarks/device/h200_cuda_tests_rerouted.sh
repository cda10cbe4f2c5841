#!/bin/bash
# (2026-12-02, sixth session; carry .whl/) The CUDA tests with the re-measured routing.json.
python3 -m pip install -q --no-index --no-deps --no-cache-dir --target /tmp/site .whl/faiss*.whl .whl/efficientnet_lite_pytorch*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 PYTHONPYCACHEPREFIX=/tmp/pyc
mkdir -p $OUT/r
timeout 200 python3 -m pytest -q -p no:cacheprovider -rs tests/test_cuda.py tests/test_gpu.py > $OUT/r/pytest_cuda_h200.txt 2>&1; echo "rc $?"
tail -n 12 $OUT/r/pytest_cuda_h200.txt
