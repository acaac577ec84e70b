"""Several exports of the same model, timed by interleaved ONNX Runtime CPU calls: the CPU effect of a graph
restructuring, with the load of a shared machine hitting every export alike (order alternates per round).

    python benchmarks/exports_paired.py OLD.onnx NEW.onnx [...] [--rounds 12] [--record NAME --title TEXT]

Each export's median and min latency per call and its ratio to the first; per-stage times are `bench`'s job.
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

from record import md_table, record

from hsnet_deploy.runtime.bench import random_feed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("models", nargs="+", type=Path, help="FP32 exports of one image size (the first is the base).")
    parser.add_argument("--rounds", type=int, default=12, help="Calls per export, interleaved.")
    parser.add_argument("--size", type=int, default=400)
    parser.add_argument("--shots", type=int, default=1)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--record", help="Section name in docs/benchmarks.md to write the table into.")
    parser.add_argument("--title", default="Exports compared by interleaved ONNX Runtime CPU calls")
    parser.add_argument("--note", default="")
    args = parser.parse_args()

    import onnxruntime as ort

    from hsnet_deploy.runtime.ort_options import session_options

    feed = random_feed(1, args.shots, args.size)
    sessions = []
    for path in args.models:
        session = ort.InferenceSession(str(path), session_options("all", args.threads), providers=["CPUExecutionProvider"])
        session.run(None, feed)  # warm-up: first-call allocations stay out of the figures
        sessions.append(session)
    times: list[list[float]] = [[] for _ in sessions]
    for round_ in range(args.rounds):
        order = range(len(sessions)) if round_ % 2 == 0 else reversed(range(len(sessions)))
        for i in order:
            start = time.perf_counter()
            sessions[i].run(None, feed)
            times[i].append((time.perf_counter() - start) * 1000)
    base = statistics.median(times[0])
    rows = [[p.name, statistics.median(t), min(t), f"{statistics.median(t) / base:.3f}"]
            for p, t in zip(args.models, times)]
    table = md_table(["export", "median ms", "min ms", "median / first"], rows)
    print(table)
    if args.record:
        record(args.record, args.title, f"Exports at {args.size}x{args.size}, B = 1, K = {args.shots}, "
               f"{args.rounds} interleaved calls each.\n\n{table}\n\n{args.note}")


if __name__ == "__main__":
    main()
