"""What the interpreter's teardown costs a ``dhf`` command after ``import torch``.

    python benchmarks/bench_exit.py [--rounds 6] [--json OUT] [-- DHF ARGS...]

Each round runs, in fresh processes, ``import torch`` (plus this package's CLI, faiss and h5py,
what a command has loaded) and then ends (a) with a normal exit and (b) through the CLI's
``_leave`` (threads joined, atexit handlers run, streams flushed, then ``os._exit``). The time
measured ("normal", "leave" in ``seconds``) is from the child's last line of output (a timestamp) to its end, as seen by the parent.
With ``-- DHF ARGS...`` it also times that whole ``dhf`` command (e.g. a one-shot ``search``)
both ways, interleaved: ``python -m deephash_faiss.cli ARGS`` against the same with ``_leave``
replaced by ``sys.exit`` (the exit before ``_leave``).
"""
from __future__ import annotations

import argparse
import json
import platform
import statistics
import subprocess
import sys
import time

LOAD = "import torch, faiss, h5py, deephash_faiss.cli as c, time; x = torch.zeros(8); print(time.time(), flush=True)"
CASES = {"normal": LOAD, "leave": LOAD + "; c._leave(0)"}
OLD_CLI = "import sys, deephash_faiss.cli as c; c._leave = sys.exit; c.main()"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=6)
    ap.add_argument("--json")
    ap.add_argument("command", nargs="*", help="a dhf command's arguments, after --")
    a = ap.parse_args()
    got: dict[str, list[float]] = {k: [] for k in CASES}
    cmds = {"command_leave": [sys.executable, "-m", "deephash_faiss.cli", *a.command],
            "command_sys_exit": [sys.executable, "-c", OLD_CLI, *a.command]} if a.command else {}
    got.update({k: [] for k in cmds})
    for _ in range(a.rounds):
        for name, code in CASES.items():  # interleaved: drift on the machine hits both alike
            p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
            got[name].append(time.time() - float(p.stdout.split()[-1]))
        for name, cmd in cmds.items():
            t = time.perf_counter()
            subprocess.run(cmd, capture_output=True, text=True, check=True)
            got[name].append(time.perf_counter() - t)
    import torch

    out = {"date": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()), "python": platform.python_version(),
           "torch": torch.__version__, "machine": platform.machine(), "cpus": __import__("os").cpu_count(),
           "command": a.command or None, "seconds": {k: [round(v, 4) for v in vs] for k, vs in got.items()},
           "median_s": {k: round(statistics.median(vs), 4) for k, vs in got.items()}}
    out["load"] = open("/proc/loadavg").read().split()[:3] if sys.platform == "linux" else None
    print(json.dumps(out["median_s"]), flush=True)
    if a.json:
        with open(a.json, "w") as f:
            json.dump(out, f, indent=1)


if __name__ == "__main__":
    main()
