"""What a busy machine does to `bench`'s figures: PyTorch eager and ONNX Runtime on the CPU timed as `bench` times
them (`bench_runner`), on a quiet machine and with N processes each spinning one core, plus what `bench` measured
of that load (`other_cpu_cores`, machine.py). PyTorch's OpenMP threads wait at barriers for a thread the OS has
preempted, so the eager baseline, and every "vs eager" ratio, moves far more than the deployed runner.

    python benchmarks/busy_machine.py --model m64.onnx --spinners 0 1 --iters 12 [--record]
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time

from record import md_table, record

from hsnet_deploy.machine import usable_cores
from hsnet_deploy.model import seeded_model
from hsnet_deploy.runtime.artifact import eager_baselines, open_artifact
from hsnet_deploy.runtime.bench import bench_runner, random_feed

SPIN = "import time\nend = time.time() + {s}\nwhile time.time() < end:\n    pass\n"


def timed(runner, feed, iters: int, warmup: int) -> tuple[float, float | None]:
    result = bench_runner(runner, feed, iters, warmup)
    return result.latency_ms["p50"], result.other_cpu_cores


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="An ONNX export (64x64 keeps the eager calls short).")
    parser.add_argument("--spinners", type=int, nargs="+", default=[0, 1], help="Busy processes per row.")
    parser.add_argument("--iters", type=int, default=12)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--record", action="store_true", help="Write the table into docs/benchmarks.md.")
    args = parser.parse_args()

    ort = open_artifact(args.model, "cpu")
    size, backbone = ort.info.img_size, ort.info.backbone
    eager = eager_baselines(seeded_model(backbone, 0), cpu=True, cuda=False)[0]
    feed = random_feed(1, 1, size)
    rows = []
    for spinners in args.spinners:
        procs = [subprocess.Popen([sys.executable, "-c", SPIN.format(s=600)]) for _ in range(spinners)]
        try:
            time.sleep(0.5)
            eager_ms, eager_load = timed(eager, feed, args.iters, args.warmup)
            ort_ms, ort_load = timed(ort, feed, args.iters, args.warmup)
        finally:
            for p in procs:
                p.kill()
                p.wait()
        shown = ["-" if load is None else f"{load:.2f}" for load in (eager_load, ort_load)]
        rows.append([spinners, shown[0], eager_ms, shown[1], ort_ms, eager_ms / ort_ms])
        print(rows[-1], flush=True)
    table = md_table(["spinning processes", "other cores (eager)", "eager p50 ms", "other cores (ORT)",
                      "ORT p50 ms", "eager / ORT"], rows)
    print(table)
    if args.record:
        record("busy_machine", "A busy machine: what other processes do to `bench`'s figures (fifth audit)",
               f"{backbone} {size}x{size}, B = K = 1, {usable_cores()} usable cores; each row times eager then ONNX "
               f"Runtime as `bench` does ({args.iters} calls after {args.warmup} warm-up); 'other cores' is what "
               "`bench` now measures and reports of the load (`other_cpu_cores` in `--json`, a note when it reaches "
               "0.25 of a core).\n\n" + table)


if __name__ == "__main__":
    main()
