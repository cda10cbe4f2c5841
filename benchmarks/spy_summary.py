"""Summarise a py-spy ``record -f raw --threads`` profile: samples per thread, and for one thread
the innermost deephash_faiss frame (and the leaf frame) of the samples taken inside a module.

    python benchmarks/spy_summary.py PROFILE.txt [--thread MainThread] [--within stream.py] [--top 15]

Used for the H200 CIFAR-10 build profiles of ``benchmarks/device/h200_cifar_spy.sh`` (issue 12).
"""
from __future__ import annotations

import argparse
import collections


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("profile")
    ap.add_argument("--thread", default="MainThread")
    ap.add_argument("--within", default="stream.py", help="count only samples with a frame in this file")
    ap.add_argument("--top", type=int, default=15)
    a = ap.parse_args()
    threads, inner, total, within = collections.Counter(), collections.Counter(), 0, 0
    for line in open(a.profile):
        stack, _, n = line.rstrip().rpartition(" ")
        frames, n = stack.split(";"), int(n)
        threads[frames[0]] += n
        total += n
        if not frames[0].endswith(a.thread) or not any(a.within in f for f in frames):
            continue
        within += n
        ours = [f for f in frames if "deephash_faiss/" in f]
        inner[f"{ours[-1] if ours else '-'} | {frames[-1]}"] += n
    print(f"{a.profile}: {total} samples")
    for t, c in threads.most_common(8):
        print(f"  {c:7d} {100 * c / total:5.1f}%  {t[:90]}")
    print(f"{a.thread}, samples with a frame in {a.within}: {within}")
    for k, c in inner.most_common(a.top):
        print(f"  {c:7d} {100 * c / max(within, 1):5.1f}%  {k[:170]}")


if __name__ == "__main__":
    main()
