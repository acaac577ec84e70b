"""Issue 13's GPU matrix in one script, for one short device call (docs: ../shared/docs/gpu.md).

Default: resnet50, 400x400, K = 1, B = 1 and 8. Per runner and B: cold call, p50 / mean / min ms, episodes/s;
for ONNX Runtime CUDA also the device-I/O latency (inputs already on the GPU) and the largest logit error
relative to eager FP32 with TF32 off (the parity figure).
  --part torch: PyTorch eager FP32 (cuDNN's TF32 default), eager FP16 autocast, torch.compile
                mode="reduce-overhead" FP16 autocast (with its compile time per B)
  --part ort:   ONNX Runtime CUDA FP32 and FP16 (--fp16-onnx), host I/O and device I/O, each without and
                with CUDA graphs; then the FP32 graph runner under each non-default CUDA EP option
  --part all:   both (the default)
After every runner the figures so far are written to OUT/gpu-<part>.json (atomically), so a timeout keeps
what was measured; a runner that fails is recorded with its error and the next one runs. --budget-s stops
starting runners after that many seconds.

`benchmarks/gpu_kit.py` packs everything below into parts and prints the device calls in order.
The ONNX files, made here and carried (gpu.md), seeded weights so the parity figures can be checked:
    hsnet-deploy export --backbone resnet50 --seed 0 -o .gpu/resnet50-400.onnx
    hsnet-deploy build-engine .gpu/resnet50-400.onnx --fp16 -o .gpu/resnet50-400-fp16.onnx
On the GPU machine:
    PYTHONPATH=/tmp/site:$PWD python3 benchmarks/gpu.py --out $OUT \\
        --onnx /tmp/stage/resnet50-400.onnx --fp16-onnx /tmp/stage/resnet50-400-fp16.onnx
The torch part needs no onnxruntime-gpu, so it can run in the background while the wheel travels:
    setsid nohup python3 benchmarks/gpu.py --part torch --out /tmp/gpu-out > /tmp/gpu.log 2>&1 < /dev/null &
and the last call runs `--part ort --out $OUT` and copies /tmp/gpu-out/gpu-torch.* and /tmp/gpu.log into $OUT.
CPU dry run (every path that needs no CUDA; CUDA rows are listed as skipped, with the reason):
    python3 benchmarks/gpu.py --device cpu --size 64 --iters 3 --compile-backend eager --out /tmp/gpu-dry
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

import numpy as np
import torch
from record import md_table, record

from hsnet_deploy.model import seeded_model
from hsnet_deploy.runtime.artifact import inspect_artifact, open_artifact, open_model
from hsnet_deploy.runtime.bench import device_io_latency, latency_summary, random_feed
from hsnet_deploy.runtime.ort_cuda import CUDA_EP_CHOICES, CUDA_EP_DEFAULTS

SEED = 0


def ep_sweep() -> list[dict[str, str]]:
    """One change from the defaults per entry: every value of every option this project exposes."""
    return [{key: value} for key, values in CUDA_EP_CHOICES.items() for value in values
            if value != CUDA_EP_DEFAULTS[key]]


class Matrix:
    """The figures so far, rewritten atomically after every runner."""

    def __init__(self, out: Path, part: str, config: dict) -> None:
        self.path = out / f"gpu-{part}.json"
        self.data = {"config": config, "machine": machine(), "rows": [], "skipped": [], "errors": []}
        self.start = time.perf_counter()

    def elapsed(self) -> float:
        return time.perf_counter() - self.start

    def save(self) -> None:
        self.data["elapsed_s"] = round(self.elapsed(), 1)
        fd, tmp = tempfile.mkstemp(dir=self.path.parent, prefix=".gpu-", suffix=".json")
        with os.fdopen(fd, "w") as fh:
            json.dump(self.data, fh, indent=1, default=str)
        os.replace(tmp, self.path)

    def skip(self, name: str, reason: str) -> None:
        self.data["skipped"].append({"runner": name, "reason": reason})
        print(f"skip {name}: {reason}", flush=True)
        self.save()


def machine() -> dict:
    info = {"python": sys.version.split()[0], "torch": torch.__version__, "cores": os.cpu_count()}
    try:
        import onnxruntime

        info["onnxruntime"] = onnxruntime.__version__
        info["ort_providers"] = onnxruntime.get_available_providers()
    except ImportError:
        info["onnxruntime"] = None
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
        try:
            info["driver"] = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                                            capture_output=True, text=True, timeout=20, check=False).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            info["driver"] = None
    return info


def measure(matrix: Matrix, name: str, make_runner, feeds: dict[int, dict], args, refs: dict | None = None,
            extra: dict | None = None) -> None:
    """Open the runner once, then per B: cold call, warm-up, timed calls, device I/O where it has it."""
    if matrix.elapsed() > args.budget_s:
        matrix.skip(name, f"time budget of {args.budget_s:.0f} s spent")
        return
    print(f"run {name} ...", flush=True)
    try:
        runner = make_runner()
        with runner:
            for b, feed in feeds.items():
                runner.inference_times.clear()
                out = runner.infer(feed)
                cold_ms = runner.inference_times[-1] * 1e3
                for _ in range(args.warmup):
                    runner.infer(feed)
                runner.inference_times.clear()
                for _ in range(args.iters):
                    runner.infer(feed)
                lat = latency_summary(runner.inference_times)
                row = {"runner": name, "B": b, "K": args.shots, "cold_ms": cold_ms, "latency_ms": lat,
                       "episodes_per_s": b / (lat["mean"] / 1e3), **(extra or {})}
                if runner.supports_device_io:
                    row["device_io_ms"] = device_io_latency(runner, feed, args.iters, args.warmup)
                compile_s = (runner.info.details.get("compile_s") or {}).get((b, args.shots))
                if compile_s is not None:
                    row["compile_s"] = compile_s
                if refs is not None and b in refs:
                    ref = refs[b]
                    row["max_rel_logit_err"] = float(np.abs(out["logits"] - ref["logits"]).max()
                                                     / np.abs(ref["logits"]).max())
                    row["mask_agreement"] = float((out["mask"] == ref["mask"]).mean())
                if args.device == "cuda":
                    row["torch_peak_mb"] = torch.cuda.max_memory_allocated() / 2**20
                matrix.data["rows"].append(row)
                print(f"  B={b}: p50 {lat['p50']:.2f} ms"
                      + (f", device I/O p50 {row['device_io_ms']['p50']:.2f} ms" if "device_io_ms" in row else "")
                      + (f", compile {compile_s:.1f} s" if compile_s is not None else ""), flush=True)
                matrix.save()
    except Exception as exc:  # noqa: BLE001 - one failing runner must not lose the others' figures
        matrix.data["errors"].append({"runner": name, "error": f"{type(exc).__name__}: {exc}"[:2000],
                                      "trace": traceback.format_exc()[-3000:]})
        print(f"  FAILED: {type(exc).__name__}: {str(exc)[:300]}", flush=True)
        matrix.save()


def torch_part(matrix: Matrix, model, feeds, args) -> None:
    dev = args.device
    measure(matrix, "pytorch eager fp32", lambda: open_model(model, dev, "fp32"), feeds, args)
    if dev == "cuda":
        measure(matrix, "pytorch eager fp16 autocast", lambda: open_model(model, dev, "fp16"), feeds, args)
    else:
        matrix.skip("pytorch eager fp16 autocast", "FP16 autocast is for CUDA")
    precision = "fp16" if dev == "cuda" else "fp32"
    measure(matrix, f"torch.compile reduce-overhead {precision}",
            lambda: open_model(model, dev, precision, compile_mode="reduce-overhead", compile_backend=args.compile_backend), feeds, args,
            extra={"compile_backend": args.compile_backend})


def parity_refs(model, feeds, device: str) -> dict[int, dict]:
    """Eager FP32 with TF32 off: the reference the FP32 artifacts are verified against."""
    saved = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    try:
        with open_model(model, device, "fp32") as runner:
            return {b: runner.infer(feed) for b, feed in feeds.items()}
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved


def ort_part(matrix: Matrix, model, feeds, args) -> None:
    import onnxruntime

    if hasattr(onnxruntime, "preload_dlls"):
        onnxruntime.preload_dlls()  # onnxruntime-gpu finds the CUDA libraries of the nvidia-* wheels
    onnx_path = args.onnx or export_here(args)
    if onnx_path is None:
        matrix.skip("onnxruntime (all)", "no ONNX model: pass --onnx (export failed here, see errors)")
        return
    meta = inspect_artifact(onnx_path).meta
    if meta.get("weights") == "seeded-random" and int(meta.get("seed", -1)) == SEED \
            and meta.get("backbone") == args.backbone and int(meta.get("img_size", 0)) == args.size:
        refs = parity_refs(model, feeds, args.device)
    else:
        refs = None
        matrix.skip("parity figures", f"{onnx_path} is not {args.backbone} {args.size}x{args.size} with seeded "
                    f"weights (seed {SEED}); latency only")
    variants = [("fp32", onnx_path)] + ([("fp16", args.fp16_onnx)] if args.fp16_onnx else [])
    if not args.fp16_onnx:
        matrix.skip("onnxruntime fp16", "no --fp16-onnx given")
    if args.device != "cuda" or "CUDAExecutionProvider" not in onnxruntime.get_available_providers():
        reason = "no CUDA GPU" if args.device != "cuda" else "no CUDAExecutionProvider (onnxruntime-gpu)"
        for precision, path in variants:
            measure(matrix, f"onnxruntime-cpu {precision}", lambda p=path: open_artifact(p, "cpu"), feeds, args,
                    refs if precision == "fp32" else None)
        matrix.skip("onnxruntime-cuda (host I/O, device I/O, CUDA graphs, EP options)", reason)
        return
    for precision, path in variants:
        check = refs if precision == "fp32" else None
        measure(matrix, f"onnxruntime-cuda {precision}", lambda p=path: open_artifact(p, "cuda"), feeds, args,
                check, extra={"cuda_graph": False})
        measure(matrix, f"onnxruntime-cuda {precision} graph",
                lambda p=path: open_artifact(p, "cuda", cuda_graph=True), feeds, args, check,
                extra={"cuda_graph": True})
    # NHWC is where cuDNN's FP16 (and TF32) convolutions find tensor-core kernels; with prefer_nhwc=1 some nodes
    # fall back to the CPU EP and graph capture is refused (the sweep's entry below says which), so these run
    # without a graph: is NHWC worth making those nodes CUDA-only?
    for precision, path in variants:
        measure(matrix, f"onnxruntime-cuda {precision} prefer_nhwc=1",
                lambda p=path: open_artifact(p, "cuda", ep_options={"prefer_nhwc": "1"}), feeds, args,
                refs if precision == "fp32" else None, extra={"cuda_graph": False, "ep_options": {"prefer_nhwc": "1"}})
    for option in ep_sweep():
        label = ",".join(f"{k}={v}" for k, v in option.items())
        measure(matrix, f"onnxruntime-cuda fp32 graph {label}",
                lambda o=option: open_artifact(onnx_path, "cuda", cuda_graph=True, ep_options=o), feeds, args,
                refs, extra={"cuda_graph": True, "ep_options": option})


def export_here(args) -> Path | None:
    from hsnet_deploy.export import export_onnx

    path = args.out / f".{args.backbone}-{args.size}.onnx"
    if not path.exists():
        try:
            export_onnx(seeded_model(args.backbone, SEED), path, args.size,
                        source={"weights": "seeded-random", "seed": SEED})
        except Exception as exc:  # noqa: BLE001 - torch 2.11's export failure is a finding, not a crash
            print(f"export failed: {type(exc).__name__}: {str(exc)[:300]}", flush=True)
            return None
    return path


def summary(matrix: Matrix) -> str:
    rows = []
    for r in matrix.data["rows"]:
        rows.append([r["runner"], r["B"], r["latency_ms"]["p50"], r["latency_ms"]["mean"], r["episodes_per_s"],
                     (r.get("device_io_ms") or {}).get("p50"), r.get("max_rel_logit_err"), r.get("compile_s")])
    rows = [["-" if v is None else v for v in row] for row in rows]
    body = md_table(["runner", "B", "p50 ms", "mean ms", "episodes/s", "device-I/O p50", "max rel err",
                     "compile s"], rows)
    m = matrix.data["machine"]
    body += (f"\n\nGPU: {m.get('gpu', 'none')} (driver {m.get('driver')}), torch {m['torch']}, onnxruntime "
             f"{m.get('onnxruntime')}; {matrix.data['config']}")
    for s in matrix.data["skipped"]:
        body += f"\n- skipped {s['runner']}: {s['reason']}"
    for e in matrix.data["errors"]:
        body += f"\n- FAILED {e['runner']}: {e['error'][:200]}"
    return body


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True, help="Folder for gpu-<part>.json / .md ($OUT).")
    parser.add_argument("--part", choices=["all", "torch", "ort"], default="all")
    parser.add_argument("--device", choices=["cuda", "cpu"], default="cuda", help="cpu: the dry run.")
    parser.add_argument("--backbone", default="resnet50")
    parser.add_argument("--size", type=int, default=400)
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--shots", type=int, default=1)
    parser.add_argument("--iters", type=int, default=30)
    parser.add_argument("--warmup", type=int, default=5, help="Untimed calls after the cold one (graphs capture).")
    parser.add_argument("--onnx", type=Path, help="FP32 ONNX of seeded weights (seed 0); exported here if absent.")
    parser.add_argument("--fp16-onnx", type=Path, help="The FP16 variant of --onnx.")
    parser.add_argument("--compile-backend", default="inductor", help="torch.compile backend (eager: dry run).")
    parser.add_argument("--budget-s", type=float, default=240.0, help="Start no runner after this many seconds.")
    parser.add_argument("--record", action="store_true", help="Also write the table into docs/benchmarks.md.")
    args = parser.parse_args()
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("Error: --device cuda but PyTorch sees no CUDA GPU (use --device cpu for the dry run)")
    for path in (args.onnx, args.fp16_onnx):
        if path is not None and not path.is_file():
            raise SystemExit(f"Error: {path}: ONNX file not found")
    args.out.mkdir(parents=True, exist_ok=True)
    config = {"backbone": args.backbone, "size": args.size, "batches": args.batches, "shots": args.shots,
              "iters": args.iters, "warmup": args.warmup, "device": args.device, "seed": SEED,
              "onnx": str(args.onnx) if args.onnx else None, "fp16_onnx": str(args.fp16_onnx) if args.fp16_onnx else None}
    matrix = Matrix(args.out, args.part, config)
    matrix.save()
    model = seeded_model(args.backbone, SEED).eval()
    feeds = {b: random_feed(b, args.shots, args.size, seed=b) for b in args.batches}
    if args.part in ("all", "torch"):
        torch_part(matrix, model, feeds, args)
    if args.part in ("all", "ort"):
        ort_part(matrix, model, feeds, args)
    body = summary(matrix)
    (args.out / f"gpu-{args.part}.md").write_text(body + "\n")
    print(body, flush=True)
    if args.record:
        record(f"gpu-{args.part}", f"GPU matrix ({args.part}): PyTorch, torch.compile, ONNX Runtime CUDA", body)


if __name__ == "__main__":
    main()
