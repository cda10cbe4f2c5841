# Sourced by the eighth session's H200 scripts (2026-12-03; carry .whl/): install the carried
# wheels, set the environment, and compile the bytecode of torch, the wheels, this package and
# ${COMPILE_EXTRA} first (the host runs Python with PYTHONDONTWRITEBYTECODE=1 and ships torch
# without __pycache__: every process would compile torch from source, import torch 4.2-5.9 s
# against 2.1-2.3 s). Defines T0, t (a timestamped line) and R ($OUT/r).
T0=$(date +%s); t() { echo "[$(( $(date +%s) - T0 )) s] $*"; }
python3 -m pip install -q --no-index --no-deps --no-cache-dir --target /root/site .whl/*.whl || exit 1
export PYTHONPATH=/root/site:$PWD PYTHONUNBUFFERED=1 PYTHONPYCACHEPREFIX=/tmp/pyc
R=$OUT/r; mkdir -p $R
SP=$(python3 -c "import importlib.util, os; print(os.path.dirname(os.path.dirname(importlib.util.find_spec('torch').origin)))")
python3 -m compileall -q -j 16 $SP /root/site $PWD/deephash_faiss ${COMPILE_EXTRA:-} > /dev/null 2>&1
