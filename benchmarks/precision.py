"""FP32 / FP16 / INT8 side by side on the CPU: speed against PyTorch eager in the same run, and each gate.

    python benchmarks/precision.py --img-size 400 --threads 2 --json precision.json
    python benchmarks/precision.py --onnx model.onnx --calib-data DIR --sweep   # also time each INT8 stage set

Without --calib-data it writes a synthetic calibration directory (simple layout: textured ellipses with
masks). Without --onnx it exports the seeded resnet50 with its final decoder bias balanced so about half
the pixels are foreground (calibration/synthetic.py): a seeded model otherwise predicts all background and
mask agreement says nothing. Runners are timed round-robin (one call each per round) so that load from
other processes on a shared machine hits all of them alike; the table gives median and min.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx
import torch

from hsnet_deploy.artifacts import props_to_meta
from hsnet_deploy.calibration.episodes import load_sample, split_episodes
from hsnet_deploy.calibration.gate import GateThresholds
from hsnet_deploy.calibration.synthetic import (
    FINAL_CONV,
    balance_decoder_bias,
    synthetic_samples,
    write_simple_layout,
)
from hsnet_deploy.calibration.variant import make_variant
from hsnet_deploy.errors import GateFailure
from hsnet_deploy.model import seeded_model

SWEEP = (("backbone",), ("backbone", "correlation"), ("backbone", "correlation", "learner"),
         ("backbone", "correlation", "learner", "decoder"))


def balanced_model(img_size: int) -> tuple[torch.nn.Module, float]:
    model = seeded_model("resnet50", 0)
    return model, balance_decoder_bias(model, synthetic_samples(3, img_size, seed=100))


def export_model(model, img_size: int, shift: float, out: Path) -> Path:
    from hsnet_deploy.export import export_onnx

    report = export_onnx(model, out, img_size, source={"weights": "seeded-random-balanced", "seed": 0,
                                                       "bias_shift": shift})
    if not report.passed:
        sys.exit("export verification failed")
    return out


def time_round_robin(runners: dict, feed: dict, iters: int, warmup: int) -> dict[str, dict]:
    for fn in runners.values():
        for _ in range(warmup):
            fn(feed)
    times: dict[str, list[float]] = {name: [] for name in runners}
    for _ in range(iters):
        for name, fn in runners.items():
            start = time.perf_counter()
            fn(feed)
            times[name].append(time.perf_counter() - start)
    return {name: {"median_ms": float(np.median(t) * 1e3), "min_ms": float(np.min(t) * 1e3),
                   "mean_ms": float(np.mean(t) * 1e3)} for name, t in times.items()}


def ort_fn(path: Path, threads: int):
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.log_severity_level = 3
    session = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    return lambda feed: session.run(None, feed)


def eager_fn(model):
    def run(feed):
        with torch.inference_mode():
            return model(*(torch.from_numpy(feed[k]) for k in ("query_img", "support_imgs", "support_masks")))
    return run


def fp16_ranges(model, samples) -> dict:
    """What FP16 would have to hold: correlation sums of squares, GroupNorm squares, mask residues."""
    from hsnet_deploy.model.learner import GroupNorm6d
    from hsnet_deploy.model.resize import interpolation_matrix

    stats = {"l2_sum_squares_max": 0.0, "groupnorm_centred_square_max": 0.0, "mask_values_below_fp16_min": 0}
    hooks = []

    def gn_hook(module, inputs, _output):
        x = inputs[0]
        g = x.reshape(x.shape[0], module.num_groups, -1)
        centred = g - g.mean(dim=-1, keepdim=True)
        stats["groupnorm_centred_square_max"] = max(stats["groupnorm_centred_square_max"],
                                                    float((centred * centred).max()))

    for module in model.modules():
        if isinstance(module, GroupNorm6d):
            hooks.append(module.register_forward_hook(gn_hook))
    try:
        with torch.inference_mode():
            for s in samples:
                q, sup, m = (torch.from_numpy(s.feed[k]) for k in ("query_img", "support_imgs", "support_masks"))
                model(q, sup, m)
                feats = model.backbone.hypercolumns(q) + model.backbone.hypercolumns(sup[0])
                for f in feats:
                    stats["l2_sum_squares_max"] = max(stats["l2_sum_squares_max"], float((f * f).sum(dim=1).max()))
                for size in {tuple(f.shape[-2:]) for f in feats}:
                    ry = interpolation_matrix(m.shape[-2], size[0])
                    rx = interpolation_matrix(m.shape[-1], size[1])
                    r = ry @ m[0] @ rx.t()
                    stats["mask_values_below_fp16_min"] += int(((r > 0) & (r < 5.96e-8)).sum())
    finally:
        for h in hooks:
            h.remove()
    stats["fp16_max"] = 65504.0
    return stats


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--onnx", type=Path, help="FP32 export to use (else: the balanced seeded resnet50 is exported)")
    ap.add_argument("--img-size", type=int, default=400)
    ap.add_argument("--calib-data", type=Path)
    ap.add_argument("--calib-episodes", type=int, default=16)
    ap.add_argument("--gate-episodes", type=int, default=12)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--iters", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--sweep", action="store_true", help="also make and time an INT8 variant per stage set")
    ap.add_argument("--no-fp16", action="store_true")
    ap.add_argument("--workdir", type=Path, default=None)
    ap.add_argument("--reuse", action="store_true",
                    help="reuse variants already in --workdir (their gate report is read from their metadata)")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()

    torch.set_num_threads(args.threads)
    work = args.workdir or Path(tempfile.mkdtemp(prefix="hsnet-precision-"))
    work.mkdir(parents=True, exist_ok=True)
    model, shift = balanced_model(args.img_size)
    src = args.onnx or work / f"fp32_{args.img_size}.onnx"
    if args.onnx is None and not src.exists():
        export_model(model, args.img_size, shift, src)
    meta = props_to_meta({p.key: p.value for p in onnx.load(str(src), load_external_data=False).metadata_props})
    if "bias_shift" in meta:  # eager must run the very weights that were exported
        model = seeded_model("resnet50", 0)
        with torch.no_grad():
            model.get_submodule(FINAL_CONV).bias[1] += float(meta["bias_shift"])
    calib = args.calib_data
    if calib is None:
        calib = work / "calib"
        if not calib.exists():
            write_simple_layout(calib, args.calib_episodes + args.gate_episodes, args.img_size, seed=3)

    results: dict = {"img_size": args.img_size, "threads": args.threads, "batch": 1, "shots": 1,
                     "model": meta.get("weights"), "variants": {}}
    split = split_episodes(calib, args.calib_episodes, args.gate_episodes, 0)
    results["fp16_ranges"] = fp16_ranges(model, [load_sample(e, args.img_size) for e in split.gate[:4]])
    print("FP16 ranges:", json.dumps(results["fp16_ranges"]), flush=True)

    plans = [("int8-onnxruntime", "int8", "onnxruntime", None), ("int8-tensorrt", "int8", "tensorrt", None)]
    if not args.no_fp16:
        plans.insert(0, ("fp16", "fp16", "onnxruntime", None))
    if args.sweep:
        plans += [(f"int8-ort[{'+'.join(s)}]", "int8", "onnxruntime", s) for s in SWEEP]
    loose = GateThresholds(min_mean_agreement=None, min_sign_agreement=None, max_miou_drop=None)
    # Seeded weights: the synthetic ground truth says nothing, so agreement with FP32 decides (the
    # no-ground-truth defaults); a trained checkpoint with real episodes would use the mIoU drop.
    agreement = {"max_miou_drop": None, "min_mean_agreement": 0.95, "min_sign_agreement": 0.999}
    for name, precision, backend, stages in plans:
        out = work / f"{name.replace('[', '_').replace(']', '').replace('+', '_')}.onnx"
        start = time.perf_counter()
        if args.reuse and out.exists():
            vmeta = props_to_meta({p.key: p.value for p in onnx.load(str(out), load_external_data=False).metadata_props})
            results["variants"][name] = {"path": str(out), "gate": vmeta["gate"], "variant": vmeta["variant"],
                                         "reused": True}
            continue
        try:
            vmeta, report = make_variant(src, out, precision, calib_dir=calib, calib_episodes=args.calib_episodes,
                                         gate_episodes=args.gate_episodes, backend=backend, quantize=stages,
                                         threads=args.threads, progress=True,
                                         thresholds=loose if args.sweep and stages else agreement)
            entry = {"path": str(out), "gate": report.to_dict(), "variant": vmeta["variant"]}
        except GateFailure as exc:
            entry = {"path": None, "gate": exc.report.to_dict(), "error": str(exc)}
        entry["build_s"] = round(time.perf_counter() - start, 1)
        results["variants"][name] = entry
    for name, entry in results["variants"].items():
        gate = entry["gate"]
        # verdict under the no-ground-truth defaults, whatever thresholds the sweep built with
        ok = gate["mean_agreement"] >= 0.95 and gate["sign_agreement"] >= 0.999
        entry["passes_default_gate"] = ok
        print(f"{name}: gate {'PASS' if ok else 'FAIL'} mean agreement {gate['mean_agreement']:.4f} "
              f"worst {gate['worst_agreement']:.4f} sign {gate['sign_agreement']:.5f} logit err "
              f"{gate['logit_error']:.4f} mIoU {gate['miou_fp32']} -> {gate['miou_variant']}", flush=True)

    feed = load_sample(split.gate[0], args.img_size).feed
    runners = {"pytorch-eager fp32": eager_fn(model), "onnxruntime fp32": ort_fn(src, args.threads)}
    for name, entry in results["variants"].items():
        if entry.get("path") and name != "int8-tensorrt":  # the TensorRT flavour is for TensorRT, not CPU speed
            runners[f"onnxruntime {name}"] = ort_fn(Path(entry["path"]), args.threads)
    timing = time_round_robin(runners, feed, args.iters, args.warmup)
    eager = timing["pytorch-eager fp32"]
    for name, t in timing.items():
        t["speedup_vs_eager_median"] = round(eager["median_ms"] / t["median_ms"], 2)
        t["speedup_vs_eager_min"] = round(eager["min_ms"] / t["min_ms"], 2)
    results["timing"] = timing
    print(f"\nB=1 K=1 {args.img_size}x{args.img_size}, {args.threads} threads, {args.iters} rounds (round-robin)")
    print(f"{'runner':45s} {'median ms':>10s} {'min ms':>10s} {'x eager (med)':>14s} {'x eager (min)':>14s}")
    for name, t in timing.items():
        print(f"{name:45s} {t['median_ms']:10.1f} {t['min_ms']:10.1f} {t['speedup_vs_eager_median']:14.2f} "
              f"{t['speedup_vs_eager_min']:14.2f}")
    if args.json:
        args.json.write_text(json.dumps(results, indent=2, default=str) + "\n")


if __name__ == "__main__":
    main()
