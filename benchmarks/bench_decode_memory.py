"""Memory of decoding large images (``data.decode_image``), each case in a fresh process.

For each case (crafted all-black PNGs that are tiny on disk: tests/corpus.crafted_png) it
reports the growth of the process's peak RSS during the decodes and of its RSS once they
are done, for 1 and 4 threads decoding at once, each thread twice in a row. ``--repo`` measures another checkout, e.g.
the code before a change:

    git -C /work/main worktree add /tmp/dhf-before <commit>
    python benchmarks/bench_decode_memory.py --repo /tmp/dhf-before --json before.json

Reproduce the numbers in docs/reliability.md:

    python benchmarks/bench_decode_memory.py --json benchmarks/results/decode_memory.json
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
sys.path.insert(0, os.path.join(REPO, "tests"))
sys.path.insert(0, HERE)

from common import machine_basics, write_json  # noqa: E402
from corpus import crafted_png, measure_decode  # noqa: E402

# (name, width, height, PNG colour type, max_pixels passed to decode_image or None)
CASES = [
    ("grey 6000x6000", 6000, 6000, 0, None),
    ("rgb 6000x6000", 6000, 6000, 2, None),
    ("rgba 4000x4000", 4000, 4000, 6, None),
    ("grey 9400x9400 (the tryout's 86 KB upload), limit 25 Mpx", 9400, 9400, 0, 25_000_000),
]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--repo", default=REPO, help="checkout whose deephash_faiss is measured")
    ap.add_argument("--threads", default="1,4", help="decodes at once, comma-separated")
    ap.add_argument("--json", help="write the results here")
    args = ap.parse_args()
    import PIL

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name, w, h, ct, max_pixels in CASES:
            path = os.path.join(tmp, f"{w}x{h}-{ct}.png")
            with open(path, "wb") as f:
                f.write(crafted_png(w, h, ct))
            for n in (int(t) for t in args.threads.split(",")):
                try:
                    m = measure_decode(path, threads=n, max_pixels=max_pixels, repo=args.repo)
                except RuntimeError as err:
                    m = {"peak_mib": None, "after_mib": None, "errors": [str(err)]}
                row = {"case": name, "file_bytes": os.path.getsize(path), "threads": n, "max_pixels": max_pixels,
                       "peak_mib": None if m["peak_mib"] is None else round(m["peak_mib"], 1),
                       "after_mib": None if m["after_mib"] is None else round(m["after_mib"], 1),
                       "errors": sorted(set(m["errors"]))}
                rows.append(row)
                print(f"{name:58s} x{n}: peak +{row['peak_mib']} MiB, after +{row['after_mib']} MiB"
                      + (f"  ({row['errors'][0][:70]})" if row["errors"] else ""), flush=True)
    if args.json:
        write_json(args.json, {"machine": {**machine_basics(), "pillow": PIL.__version__,
                                           "glibc": os.confstr("CS_GNU_LIBC_VERSION")},
                               "repo": os.path.abspath(args.repo), "date": time.strftime("%Y-%m-%d %H:%M UTC",
                                                                                         time.gmtime()),
                               "rows": rows})


if __name__ == "__main__":
    main()
