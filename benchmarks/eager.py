"""Eager PyTorch forward: resnet50, 400x400, B = 1, K = 1 and 5, threads = cores; and the authors' way
(query backbone recomputed for every shot, one 1-shot call per shot) in the same run, interleaved."""

from __future__ import annotations

import argparse
import os
import statistics
import time

import torch
from record import md_table, record

from hsnet_deploy.model import seeded_model
from hsnet_deploy.runtime.bench import random_feed


def timed(fn, iters: int) -> list[float]:
    out = []
    for _ in range(iters):
        start = time.perf_counter()
        fn()
        out.append(time.perf_counter() - start)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--iters", type=int, default=5)
    parser.add_argument("--size", type=int, default=400)
    args = parser.parse_args()
    torch.set_num_threads(os.cpu_count() or 1)
    model = seeded_model("resnet50")
    rows = []
    with torch.inference_mode():
        for k in (1, 5):
            feed = {n: torch.from_numpy(v) for n, v in random_feed(1, k, args.size).items()}
            q, s, m = feed["query_img"], feed["support_imgs"], feed["support_masks"]

            def ours():
                model(q, s, m)

            def authors():  # K separate 1-shot calls: the query backbone runs K times
                for shot in range(k):
                    model(q, s[:, shot:shot + 1], m[:, shot:shot + 1])

            ours()
            times = {"ours": [], "authors": []}
            for _ in range(args.iters):  # interleaved, so machine noise hits both alike
                times["ours"] += timed(ours, 1)
                times["authors"] += timed(authors, 1)
            med = {name: statistics.median(t) for name, t in times.items()}
            rows.append([k, med["ours"] * 1e3, min(times["ours"]) * 1e3, med["authors"] * 1e3,
                         min(times["authors"]) * 1e3, med["authors"] / med["ours"]])
    body = md_table(["K", "ours median ms", "ours min ms", "authors-style median ms", "authors-style min ms",
                     "authors / ours"], rows)
    body += (f"\n\nresnet50, {args.size}x{args.size}, B = 1, seeded weights, {args.iters} interleaved iterations. "
             "Ours: query backbone once, K shots batched through the learner. Authors-style: one 1-shot call per "
             "shot (query backbone recomputed per shot).")
    record("eager", "Eager PyTorch forward (issue: the PyTorch HSNet)", body)


if __name__ == "__main__":
    main()
