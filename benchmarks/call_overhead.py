"""What the command line and the runner interface cost before any model runs: `hsnet-deploy --help`'s wall time
(it must not import torch) and `Runner.infer`'s feed check per call at B = 1 and 8 (400x400, K = 1), beside the
ONNX Runtime CPU call it guards at B = 1 on a 64x64 export, so the check's share is a ratio from the same run."""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import time

from record import md_table, record

from hsnet_deploy.runtime.base import check_feed
from hsnet_deploy.runtime.bench import random_feed


def median_ms(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model", help="An export to time one ONNX Runtime CPU call with (e.g. 64x64).")
    parser.add_argument("--repeats", type=int, default=200)
    parser.add_argument("--record", action="store_true", help="Write the table into docs/benchmarks.md.")
    args = parser.parse_args()
    rows = []
    help_ms = median_ms(lambda: subprocess.run([sys.executable, "-m", "hsnet_deploy", "--help"], check=True,
                                               capture_output=True), 5)
    rows.append(("`hsnet-deploy --help` (wall, own process)", f"{help_ms:.0f}"))
    for batch in (1, 8):
        feed = random_feed(batch, 1, 400)
        rows.append((f"feed check, B = {batch}, 400x400", f"{median_ms(lambda f=feed: check_feed(f, 400), args.repeats):.3f}"))
    if args.model:
        from hsnet_deploy.runtime.artifact import open_artifact

        with open_artifact(args.model, "cpu") as runner:
            size = runner.info.img_size
            feed = random_feed(1, 1, size)
            runner.infer(feed)
            call = median_ms(lambda: runner.infer(feed), 10)
            check = median_ms(lambda: check_feed(feed, size), args.repeats)
        rows.append((f"ONNX Runtime CPU call, B = 1, {size}x{size}", f"{call:.1f}"))
        rows.append((f"feed check share of that call, B = 1, {size}x{size}", f"{check / call:.5f}"))
    table = md_table(["what", "median ms (or ratio)"], rows)
    print(table)
    if args.record:
        record("call_overhead", "Call overhead: `--help` and the runner's feed check (third audit)",
               table + "\n\nThe feed check (`runtime/base.py: check_feed`) runs before `inference_times` starts, so "
               "`bench` figures exclude it; a caller of `infer` pays it. Before the pixel-limit default moved to `data/limits.py`, `--help` "
               "imported torch: 1.9 s, 1.5 s of it torch (`python -X importtime`, an audit session, same machine, same day).")


if __name__ == "__main__":
    main()
