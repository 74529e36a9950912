"""Cost of the first write to freshly allocated host memory, with and without huge pages.

A growing KV store writes into new pages; the first write to each memory page traps into the
kernel, which maps and zeroes it. This allocates ``--count`` tensors of ``--mb`` MB (all kept
alive, so none reuses another's memory), times one ``fill_(0)`` of each, and prints the
median time and bandwidth; then the same fill again on the now-mapped tensors, for contrast.
``--thp 1`` sets ``THP_MEM_ALLOC_ENABLE=1`` before torch starts, as the benchmark CLI does
(large allocations on transparent huge pages); ``--thp 0`` leaves it unset.

    .venv/bin/python scripts/first_touch.py --thp 1
    .venv/bin/python scripts/first_touch.py --thp 0
"""

from __future__ import annotations

import argparse
import os
import statistics
import time


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--thp", type=int, choices=(0, 1), default=1)
    ap.add_argument("--mb", type=int, default=16, help="tensor size, MB (a 7B-shape store page is 16)")
    ap.add_argument("--count", type=int, default=20)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    if args.thp:
        os.environ["THP_MEM_ALLOC_ENABLE"] = "1"
    else:
        os.environ.pop("THP_MEM_ALLOC_ENABLE", None)
    import torch  # after the environment is set: torch reads it at start

    torch.set_num_threads(args.threads)
    nbytes = args.mb * 2**20
    kept, first, again = [], [], []
    for _ in range(args.count):
        t = torch.empty(nbytes, dtype=torch.uint8)
        t0 = time.perf_counter()
        t.fill_(0)
        first.append(time.perf_counter() - t0)
        kept.append(t)
    for t in kept:
        t0 = time.perf_counter()
        t.fill_(1)
        again.append(time.perf_counter() - t0)
    for label, times in (("first write", first), ("second write", again)):
        med = statistics.median(times)
        print(
            f"THP_MEM_ALLOC_ENABLE={args.thp}, {args.mb} MB, {args.threads} thread(s), {label}: "
            f"median {med * 1e3:.2f} ms = {nbytes / med / 1e9:.2f} GB/s"
        )


if __name__ == "__main__":
    main()
