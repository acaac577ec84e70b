"""ONNX Runtime CUDA on several exports of the same model (layouts, precisions), with the GPU kernels each runs.

For issue 13: which export layout (`hsnet-deploy export --layout`) is fastest on the GPU, and where its time
goes. Per ONNX file and B: the runner as `bench --device cuda --cuda-graph` opens it (host-I/O and device-I/O
latency, parity against eager FP32 with TF32 off for FP32 files of seeded weights), then, without the CUDA
graph, the GPU kernels of a few runs as CUPTI sees them (torch.profiler records every kernel of the process,
ONNX Runtime's too): GPU time per episode, the top kernels and a coarse split (convolution, GEMM, other).

    PYTHONPATH=/tmp/site:$PWD python3 benchmarks/gpu_layouts.py --out $OUT a.onnx b.onnx ...
CPU dry run (latency only, no kernels): --device cpu --batches 1 --iters 2
"""

from __future__ import annotations

import argparse
import sys
from collections import defaultdict
from pathlib import Path

import torch
from gpu import SEED, Matrix, measure, parity_refs
from record import md_table

from hsnet_deploy.model import seeded_model
from hsnet_deploy.runtime.artifact import inspect_artifact, open_artifact
from hsnet_deploy.runtime.bench import random_feed

CONV_MARKS = ("conv", "implicit", "winograd", "fprop", "xmma_fprop", "dgrad", "sm90_xmma")
GEMM_MARKS = ("gemm", "cutlass", "cublas", "matmul")


def kernel_kind(name: str) -> str:
    low = name.lower()
    if any(m in low for m in CONV_MARKS):
        return "convolution"
    if any(m in low for m in GEMM_MARKS):
        return "gemm"
    return "other"


def kernel_profile(path: Path, feed: dict, runs: int, top: int) -> dict:
    """GPU kernels of `runs` episodes (after two warm ones), per episode: total, by kind, the top ones."""
    from torch.profiler import ProfilerActivity, profile

    with open_artifact(path, "cuda") as runner:
        for _ in range(2):
            runner.infer(feed)
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            for _ in range(runs):
                runner.infer(feed)
            torch.cuda.synchronize()
    per_name: dict[str, list[float]] = defaultdict(lambda: [0.0, 0])
    for event in prof.events():
        if event.device_type != torch.autograd.DeviceType.CUDA:
            continue
        if event.name.startswith("Memcpy") or event.name.startswith("Memset"):
            kind_name = event.name.split()[0]
        else:
            kind_name = event.name
        per_name[kind_name][0] += event.time_range.elapsed_us() / 1e3 / runs  # ms per episode
        per_name[kind_name][1] += 1 / runs
    by_kind: dict[str, float] = defaultdict(float)
    for name, (ms, _) in per_name.items():
        by_kind["copy" if name.startswith(("Memcpy", "Memset")) else kernel_kind(name)] += ms
    ranked = sorted(per_name.items(), key=lambda kv: -kv[1][0])
    return {"gpu_ms": sum(v[0] for v in per_name.values()), "kernels": sum(v[1] for v in per_name.values()),
            "by_kind_ms": dict(by_kind),
            "top": [{"kernel": name[:160], "ms": ms, "calls": calls} for name, (ms, calls) in ranked[:top]]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("onnx", type=Path, nargs="+", help="ONNX files (exports of seeded weights, seed 0).")
    parser.add_argument("--out", type=Path, required=True, help="Folder for gpu-layouts.json / .md ($OUT).")
    parser.add_argument("--device", choices=["cuda", "cpu"], default="cuda", help="cpu: the dry run.")
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--iters", type=int, default=30)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--kernel-runs", type=int, default=5, help="Episodes profiled per file and kernel B.")
    parser.add_argument("--kernel-batches", type=int, nargs="+", help="B values whose kernels are profiled "
                        "[default: the last of --batches].")
    parser.add_argument("--top", type=int, default=12, help="Kernels listed per file.")
    parser.add_argument("--budget-s", type=float, default=400.0)
    args = parser.parse_args()
    args.shots = 1
    missing = [str(p) for p in args.onnx if not p.is_file()]
    if missing:
        raise SystemExit(f"Error: ONNX file not found: {', '.join(missing)}")
    if args.device == "cuda":
        if not torch.cuda.is_available():
            raise SystemExit("Error: --device cuda but PyTorch sees no CUDA GPU (use --device cpu for the dry run)")
        import onnxruntime

        if hasattr(onnxruntime, "preload_dlls"):
            onnxruntime.preload_dlls()
    kernel_batches = args.kernel_batches or args.batches[-1:]
    if set(kernel_batches) - set(args.batches):
        raise SystemExit(f"Error: --kernel-batches {kernel_batches} must be among --batches {args.batches}")
    args.out.mkdir(parents=True, exist_ok=True)
    metas = {p: inspect_artifact(p).meta for p in args.onnx}
    backbones = {m.get("backbone") for m in metas.values()}
    sizes = {int(m.get("img_size", 0)) for m in metas.values()}
    if len(backbones) != 1 or len(sizes) != 1:
        raise SystemExit("Error: the ONNX files differ in backbone or image size; compare one model's exports")
    backbone, size = backbones.pop(), sizes.pop()
    config = {"backbone": backbone, "size": size, "batches": args.batches, "shots": 1, "iters": args.iters,
              "warmup": args.warmup, "device": args.device, "seed": SEED, "onnx": [str(p) for p in args.onnx]}
    matrix = Matrix(args.out, "layouts", config)
    model = seeded_model(backbone, SEED).eval()
    feeds = {b: random_feed(b, 1, size, seed=b) for b in args.batches}
    refs = parity_refs(model, feeds, args.device)
    graph = args.device == "cuda"
    for path in args.onnx:
        meta = metas[path]
        label = f"{path.name} [{meta.get('layout', 'all')}, {meta.get('precision')}]"
        seeded = meta.get("weights") == "seeded-random" and int(meta.get("seed", -1)) == SEED
        check = refs if seeded and meta.get("precision") == "fp32" else None
        measure(matrix, label, lambda p=path: open_artifact(p, args.device, cuda_graph=graph), feeds, args, check,
                extra={"file": path.name, "layout": meta.get("layout", "all"), "precision": meta.get("precision")})
        for b in kernel_batches if graph else ():
            if matrix.elapsed() >= args.budget_s:
                break
            try:
                prof = kernel_profile(path, feeds[b], args.kernel_runs, args.top)
            except Exception as exc:  # noqa: BLE001 - a profiler failure must not lose the latency figures
                prof = {"error": f"{type(exc).__name__}: {exc}"[:500]}
            matrix.data.setdefault("kernels", {})[f"{label} B={b}"] = prof
            print(f"  kernels B={b}: " + (f"{prof['gpu_ms']:.2f} ms GPU, {prof['kernels']:.0f} kernels, "
                                          + ", ".join(f"{k} {v:.2f}" for k, v in prof["by_kind_ms"].items())
                                          if "error" not in prof else prof["error"]), flush=True)
            matrix.save()
        matrix.save()
    rows = [[r["runner"], r["B"], r["latency_ms"]["p50"], (r.get("device_io_ms") or {}).get("p50", "-"),
             r["episodes_per_s"], r.get("max_rel_logit_err", "-")] for r in matrix.data["rows"]]
    body = md_table(["export [layout, precision]", "B", "p50 ms", "device-I/O p50", "episodes/s", "max rel err"], rows)
    for label, prof in matrix.data.get("kernels", {}).items():
        if "error" in prof:
            body += f"\n\n{label}: kernel profile failed: {prof['error']}"
            continue
        body += (f"\n\n{label}: {prof['gpu_ms']:.2f} ms of GPU kernels per episode in {prof['kernels']:.0f} kernels ("
                 + ", ".join(f"{k} {v:.2f} ms" for k, v in sorted(prof["by_kind_ms"].items())) + ")\n\n")
        body += md_table(["kernel", "ms / episode", "calls"], [[t["kernel"][:90], t["ms"], t["calls"]] for t in prof["top"]])
    for e in matrix.data["errors"]:
        body += f"\n- FAILED {e['runner']}: {e['error'][:200]}"
    m = matrix.data["machine"]
    body += f"\n\nGPU: {m.get('gpu', 'none')} (driver {m.get('driver')}), torch {m['torch']}, onnxruntime {m.get('onnxruntime')}"
    (args.out / "gpu-layouts.md").write_text(body + "\n")
    print(body, flush=True)
    sys.exit(1 if matrix.data["errors"] else 0)


if __name__ == "__main__":
    main()
