"""`build-engine --fp16 / --int8`: make a precision variant of an FP32 export, gate it, write it atomically.

The variant is an ONNX model (FP16 = mixed precision, INT8 = explicit Q/DQ) that ONNX Runtime runs as is
and TensorRT builds strongly typed. Nothing is written unless the variant passes the accuracy gate
against the FP32 model on held-out episodes; the gate report goes into the variant's metadata.
"""

from __future__ import annotations

import os
import tempfile
import time
from collections import Counter
from collections.abc import Iterable
from pathlib import Path

import onnx

from hsnet_deploy.artifacts import (
    atomic_path,
    check_output_path,
    meta_to_props,
    props_to_meta,
    sha256_file,
    tool_versions,
)
from hsnet_deploy.calibration.episodes import (
    EpisodeSample,
    EpisodeSplit,
    load_sample,
    one_shot_feeds,
    split_episodes,
)
from hsnet_deploy.calibration.fp16 import KEEP_FP32, convert_fp16
from hsnet_deploy.calibration.gate import GateReport, GateThresholds, fp32_outputs, run_gate
from hsnet_deploy.calibration.int8 import (
    CALIBRATION_METHODS,
    DEFAULT_STAGES,
    INT8_KERNELS,
    check_stages,
    ort_optimised_graph,
    qdq_summary,
    quantize_onnxruntime,
    quantize_tensorrt,
    requantise_breaks,
)
from hsnet_deploy.calibration.synthetic import synthetic_samples
from hsnet_deploy.errors import GateFailure, UserError

PRECISIONS = ("fp16", "int8")
BACKENDS = ("onnxruntime", "tensorrt")
DEFAULT_CALIB_EPISODES = 32
DEFAULT_GATE_EPISODES = 16


def _versions() -> dict[str, str]:
    import importlib.metadata as md

    extra = {}
    for dist in ("nvidia-modelopt", "onnxconverter-common"):
        try:
            extra[dist] = md.version(dist)
        except md.PackageNotFoundError:
            continue
    return tool_versions(**extra)


def _require_quant_deps(precision: str, backend: str) -> None:
    """FP16 and TensorRT INT8 need ModelOpt; say how to install it rather than fail on an ImportError."""
    if precision == "int8" and backend == "onnxruntime":
        return
    try:
        import modelopt.onnx.quantization  # noqa: F401
    except ImportError as exc:
        raise UserError(
            f"{precision} variants need NVIDIA ModelOpt's ONNX tools ({exc}); install them with "
            "`pip install nvidia-modelopt onnx-graphsurgeon polygraphy lief` (not nvidia-modelopt[onnx], "
            "whose pins replace onnx and onnxruntime)"
        ) from None


class _Progress:
    """A rich progress bar on stderr when `enabled`, else nothing; one task at a time."""

    def __init__(self, enabled: bool) -> None:
        self.bar = None
        if enabled:
            from hsnet_deploy.console import progress_bar

            self.bar = progress_bar(transient=False)
            self.bar.start()
        self.task = None

    def start(self, description: str, total: int) -> None:
        if self.bar is not None:
            self.task = self.bar.add_task(description, total=total, status="")

    def advance(self, status: str = "") -> None:
        if self.bar is not None and self.task is not None:
            self.bar.update(self.task, advance=1, status=status)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.stop()


def _load(episodes, size: int, progress: _Progress, what: str) -> list[EpisodeSample]:
    progress.start(f"loading {what} episodes", len(episodes))
    samples = []
    for ep in episodes:
        samples.append(load_sample(ep, size))
        progress.advance()
    return samples


def variant_stages(proto: onnx.ModelProto, stages: dict[str, list[str]]) -> dict[str, list[str]]:
    """The FP32 export's stage map carried over to a variant: nodes the conversion added or renamed (FP16
    Casts, INT8 Q/DQ pairs) take the stage of their neighbours, so per-stage profiles of the variant put
    their time where it belongs rather than under "other". Lists node names and first outputs, as the
    export does (ONNX Runtime names some rewritten nodes after their output)."""
    from hsnet_deploy.export.stages import node_stages

    stage_of = {name: stage for stage, names in stages.items() for name in names}
    labelled = node_stages(proto, stage_of)
    out: dict[str, list[str]] = {stage: [] for stage in stages}
    for node in proto.graph.node:
        names = out.setdefault(labelled[node.name], [])
        names.append(node.name)
        names.extend(o for o in node.output[:1] if o and o != node.name)
    return out


def _check_request(src: Path, precision: str, backend: str, calib_method: str, calib_dir, quantize) -> tuple:
    """Refuse a request make_variant cannot honour, before any work; returns (FP32 metadata, INT8 stages)."""
    from hsnet_deploy.runtime.artifact import read_onnx_meta

    if precision not in PRECISIONS:
        raise UserError(f"precision {precision!r}: expected one of {', '.join(PRECISIONS)}")
    if backend not in BACKENDS:
        raise UserError(f"--backend {backend}: expected one of {', '.join(BACKENDS)}")
    if calib_method not in CALIBRATION_METHODS:
        raise UserError(f"--calib-method {calib_method}: expected one of {', '.join(CALIBRATION_METHODS)}")
    meta = read_onnx_meta(src)
    if meta.get("precision", "fp32") != "fp32":
        raise UserError(f"{src}: is already a {meta['precision']} variant; make variants from the FP32 export")
    if precision == "int8" and calib_dir is None:
        raise UserError("--int8 needs --calib-data DIR (episodes to calibrate on and to gate with)")
    stages = check_stages(DEFAULT_STAGES[backend] if quantize is None else quantize) if precision == "int8" else ()
    _require_quant_deps(precision, backend)
    return meta, stages


def _convert_fp16(src: Path, keep_fp32: tuple[str, ...], bar: _Progress) -> tuple[onnx.ModelProto, dict]:
    bar.start("converting to FP16 (ModelOpt AutoCast)", 1)
    proto, kept = convert_fp16(str(src), keep_fp32)
    bar.advance()
    return proto, {"kept_fp32": {g: {"reason": KEEP_FP32[g], "nodes": len(names)} for g, names in kept.items()},
                   "converter": "modelopt.onnx.autocast"}


def _quantize_int8(src: Path, calib_samples: list[EpisodeSample], stages, calib_method: str, backend: str,
                   bar: _Progress) -> tuple[onnx.ModelProto, dict]:
    feeds = [f for s in calib_samples for f in one_shot_feeds(s)]
    bar.start(f"calibrating INT8 ({backend}, {calib_method})", len(feeds))
    quantizer = quantize_onnxruntime if backend == "onnxruntime" else quantize_tensorrt
    proto, nodes = quantizer(str(src), feeds, stages, calib_method, on_feed=bar.advance)
    bar.advance()
    return proto, {
        "quantized_stages": list(stages), "quantized_nodes": len(nodes), "calib_method": calib_method,
        "scheme": ("uint8 asymmetric activations, int8 per-channel symmetric weights, QDQ (onnxruntime)"
                   if backend == "onnxruntime" else
                   "int8 symmetric activations and weights, zero-point 0, Q/DQ on weighted-op inputs (ModelOpt)"),
        "qdq": qdq_summary(proto),
    }


def _ort_int8_kernels(variant_path: Path, threads: int | None) -> dict:
    """Which INT8 kernels ONNX Runtime actually runs, and where it dequantises and requantises between them."""
    optimised = ort_optimised_graph(variant_path, threads)
    counts = Counter(n.op_type for n in optimised.graph.node)
    return {"ort_int8_kernels": {op: counts[op] for op in (*INT8_KERNELS, "QuantizeLinear", "DequantizeLinear",
                                                           "Conv", "MatMul") if counts.get(op)},
            "ort_requantise_breaks": requantise_breaks(optimised)}


def _variant_meta(src: Path, meta: dict, proto: onnx.ModelProto, precision: str, info: dict, report: GateReport,
                  split: EpisodeSplit | None, seed: int, gate_count: int) -> dict:
    new_meta = dict(props_to_meta({p.key: p.value for p in proto.metadata_props}) or meta)
    new_meta.update(meta)
    new_meta.update({
        "precision": precision,
        "variant": info,
        "gate": report.to_dict(),
        "calibration": split.info() if split else {"layout": "synthetic", "seed": seed, "gate_episodes": gate_count},
        "source_model": src.name,
        "source_sha256": sha256_file(src),
        "versions": _versions(),
        "stages": variant_stages(proto, meta.get("stages", {})),
    })
    return new_meta


def _write_variant(proto: onnx.ModelProto, meta: dict, out: Path) -> None:
    del proto.metadata_props[:]
    onnx.helper.set_model_props(proto, meta_to_props(meta))
    proto.producer_name = "hsnet-deploy"
    with atomic_path(out) as tmp_out:
        onnx.save(proto, str(tmp_out))


def make_variant(
    onnx_path: str | os.PathLike,
    out_path: str | os.PathLike,
    precision: str,
    *,
    calib_dir: str | os.PathLike | None = None,
    calib_episodes: int = DEFAULT_CALIB_EPISODES,
    gate_episodes: int = DEFAULT_GATE_EPISODES,
    seed: int = 0,
    fold: int = 0,
    backend: str = "onnxruntime",
    quantize: Iterable[str] | None = None,
    calib_method: str = "minmax",
    keep_fp32: Iterable[str] = tuple(KEEP_FP32),
    thresholds: GateThresholds | dict | None = None,
    threads: int | None = None,
    progress: bool = True,
) -> tuple[dict, GateReport]:
    """Make, gate and write a precision variant of the FP32 export `onnx_path`; returns (metadata, report).

    precision: "fp16" | "int8". backend: "onnxruntime" | "tensorrt" selects the INT8 scheme (see int8.py);
    FP16 is one model for both. calib_dir: episodes (episodes.py layouts) for calibration and the gate;
    FP16 may go without, then the gate runs on synthetic episodes (no ground truth). quantize: stages
    to quantise (default per backend, int8.DEFAULT_STAGES). thresholds: a GateThresholds used as is, or a
    dict of the thresholds a user set (e.g. {"max_miou_drop": 0.5}) laid over `GateThresholds.defaults`,
    which depend on whether the gate episodes have ground truth.
    Raises UserError for bad input and GateFailure (with `.report`) when the gate fails: nothing written.
    """
    start = time.perf_counter()
    src = Path(onnx_path)
    out = check_output_path(out_path)
    meta, stages = _check_request(src, precision, backend, calib_method, calib_dir, quantize)
    size = int(meta["img_size"])

    split: EpisodeSplit | None = None
    if calib_dir is not None:
        # FP16 calibrates nothing but draws the same split, so FP16 and INT8 gate on the same episodes.
        split = split_episodes(calib_dir, calib_episodes, gate_episodes, seed, fold, calibrate=precision == "int8")
    bar = _Progress(progress)
    try:
        gate_samples = (_load(split.gate, size, bar, "gate") if split is not None
                        else synthetic_samples(gate_episodes, size, seed=seed))
        if not isinstance(thresholds, GateThresholds):
            has_gt = any(s.query_mask is not None for s in gate_samples)  # mIoU is measured over those
            thresholds = GateThresholds.defaults(has_gt, **(thresholds or {}))

        with tempfile.TemporaryDirectory(prefix="hsnet-variant-", dir=out.parent) as tmp:
            variant_path = Path(tmp) / "variant.onnx"
            if precision == "fp16":
                proto, info = _convert_fp16(src, tuple(keep_fp32), bar)
            else:
                calib_samples = _load(split.calib, size, bar, "calibration")
                proto, info = _quantize_int8(src, calib_samples, stages, calib_method, backend, bar)
            info = {"backend": backend, **info}
            onnx.save(proto, str(variant_path))
            if precision == "int8" and backend == "onnxruntime":
                info.update(_ort_int8_kernels(variant_path, threads))

            bar.start("FP32 reference on the gate episodes", len(gate_samples))
            reference = fp32_outputs(src, gate_samples, threads, on_episode=bar.advance)
            bar.start(f"gating {precision} against FP32", len(gate_samples))
            report = run_gate(src, variant_path, gate_samples, precision, thresholds,
                              split.class_ids() if split else None, threads,
                              on_episode=lambda e: bar.advance(f"agreement {e.agreement:.3f}"), reference=reference)
            if split is None:
                report.notes.append(f"no --calib-data: gated on {len(gate_samples)} synthetic episodes (seed {seed})")

            new_meta = _variant_meta(src, meta, proto, precision, info, report, split, seed, len(gate_samples))
            if not report.passed:
                failure = GateFailure(
                    f"{precision} variant of {src.name} failed the accuracy gate: {'; '.join(report.failures())}; "
                    f"{out} was not written")
                failure.report = report  # type: ignore[attr-defined]
                raise failure
            _write_variant(proto, new_meta, out)
    finally:
        bar.close()
    new_meta["seconds"] = round(time.perf_counter() - start, 1)
    return new_meta, report
