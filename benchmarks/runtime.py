"""ONNX Runtime CPU against PyTorch eager in one run: resnet50, 400x400, B = 1, K = 1 and K = 5, with the
per-stage breakdown and the achieved GFLOP/s beside a matmul measured in the same run.

The headline ratios come from interleaved calls (eager, ORT, eager, ORT, ...) so that load from other
processes on this shared machine hits both alike; the full `bench` suite (percentiles, memory, stages)
runs after, runner by runner."""

from __future__ import annotations

import argparse
import statistics
from pathlib import Path

from record import md_table, record

from hsnet_deploy.defaults import default_artifact
from hsnet_deploy.runtime.bench import random_feed
from hsnet_deploy.runtime.suite import plan_runners, run_suite


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("artifacts", nargs="*", type=Path, help="Artifacts to compare [default: the embedded one].")
    parser.add_argument("--iters", type=int, default=10)
    parser.add_argument("--size", type=int, default=400)
    parser.add_argument("--name", default="runtime")
    args = parser.parse_args()
    paths = args.artifacts or [default_artifact(args.size)]
    interleaved = []
    for shots in (1, 5):
        runners, _, _, _ = plan_runners(paths, "cpu", None, None, False, not args.artifacts)
        feed = random_feed(1, shots, args.size)
        for r in runners:
            r.__enter__()
            r.infer(feed)
            r.inference_times.clear()
        for _ in range(args.iters):
            for r in runners:
                r.infer(feed)
        med = {r.info.label: statistics.median(r.inference_times) for r in runners}
        for r in runners:
            r.__exit__(None, None, None)
        base = med["pytorch-cpu fp32"]
        for label, t in med.items():
            interleaved.append([label, shots, t * 1e3, f"{base / t:.2f}x"])
    for label in {row[0] for row in interleaved}:
        k1 = next(row[2] for row in interleaved if row[0] == label and row[1] == 1)
        k5 = next(row[2] for row in interleaved if row[0] == label and row[1] == 5)
        interleaved.append([label, "5 vs 1", k5 / k1, "-"])
    rows, stage_rows, notes = [], [], []
    one_shot = {}
    for shots in (1, 5):
        suite = run_suite(paths, batch=1, shots=shots, iters=args.iters, warmup=2, device="cpu", threads=None,
                          backbone=None, stages=True, cuda_graph=False, default=not args.artifacts)
        for r in suite.results:
            lat = r.latency_ms
            name = f"{r.label} {Path(r.artifact).name if r.backend != 'pytorch' else ''}".strip()
            if shots == 1:
                one_shot[name] = lat["mean"]
            ratio5 = lat["mean"] / one_shot[name] if shots == 5 and name in one_shot else None
            rows.append([name, shots, lat["mean"], lat["p50"], lat["p90"], lat["min"], r.cold_ms,
                         r.gflop_per_s, f"{r.speedup_vs_eager:.2f}x",
                         f"{ratio5:.2f}x" if ratio5 else "-", f"{r.peak_rss_mb:.0f}"])
            if r.stages_ms:
                total = sum(r.stages_ms.values())
                stage_rows.append([name, shots, *[f"{r.stages_ms.get(s, 0):.0f} ({100 * r.stages_ms.get(s, 0) / total:.0f}%)"
                                                  for s in ("backbone", "correlation", "learner", "decoder", "other")]])
        notes.append(f"K={shots}: episode {suite.episode_gflop:.1f} GFLOP (FlopCounter), matmul "
                     f"{suite.matmul_gflop_per_s:.0f} GFLOP/s in the same run")
    body = "Interleaved calls (headline):\n\n" + md_table(
        ["runner", "K", "median ms (or K=5/K=1 ratio)", "speed-up vs eager"], interleaved)
    body += "\n\nFull bench suite, runner by runner:\n\n" + md_table(
        ["runner", "K", "mean ms", "p50", "p90", "min", "cold ms", "GFLOP/s", "vs eager (same run)",
                     "K=5 / K=1", "peak RSS MB"], rows)
    body += "\n\nPer-stage time, ms per episode (share):\n\n" + md_table(
        ["runner", "K", "backbone", "correlation", "learner", "decoder", "other"], stage_rows)
    body += "\n\n" + "\n".join(f"- {n}" for n in notes)
    record(args.name, f"Runtime: ONNX Runtime CPU vs PyTorch eager, {args.size}x{args.size}, B = 1", body)


if __name__ == "__main__":
    main()
