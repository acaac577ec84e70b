"""`build-engine` as one library call: an optional precision variant behind the accuracy gate, then the
backend's build (ONNX Runtime's optimised model or a TensorRT plan). The CLI parses options into a
BuildRequest, checks them (preflight), calls `build`, and prints what comes back."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from hsnet_deploy.calibration.fp16 import KEEP_FP32
from hsnet_deploy.calibration.variant import DEFAULT_CALIB_EPISODES, DEFAULT_GATE_EPISODES
from hsnet_deploy.defaults import CACHE_DIR


@dataclass
class BuildRequest:
    model: str
    output: str
    backend: str = "onnxruntime"
    precision: str = "fp32"
    device: str = "cpu"  # onnxruntime: the execution provider the model is optimised for
    # precision variants
    calib_data: str | None = None
    calib_episodes: int = DEFAULT_CALIB_EPISODES
    gate_episodes: int = DEFAULT_GATE_EPISODES
    fold: int = 0
    seed: int = 0
    quantize: list[str] | None = None
    calib_method: str = "minmax"
    thresholds: dict = field(default_factory=dict)
    fp16_keep: tuple[str, ...] = tuple(KEEP_FP32)
    variant_onnx: str | None = None
    # tensorrt
    max_batch: int = 8
    max_shots: int = 5
    opt_batch: int = 1
    opt_shots: int = 1
    workspace_gib: float = 4.0
    timing_cache: str | None = None
    version_compatible: bool = False
    tf32: bool = False

    @property
    def variant_path(self) -> str:
        """Where a variant ONNX goes: the output itself for ONNX Runtime, beside the plan for TensorRT."""
        return self.output if self.backend == "onnxruntime" else (self.variant_onnx or f"{self.output}.onnx")


@dataclass
class BuildResult:
    written: list[str]  # files, in the order written
    report: dict  # the build's report (--json): the gate's for a variant, else the backend's
    gate: object | None = None  # the variant's GateReport
    summary: str = ""  # one line for the terminal


def build(req: BuildRequest, step: Callable[[str], None] = lambda _m: None) -> BuildResult:
    """Make what `req` asks for. Raises UserError for bad input and GateFailure (with `.report`) when a
    variant fails its gate: then nothing is written."""
    if req.backend == "tensorrt":  # before minutes of calibration: fail now if the plan cannot be built here
        from hsnet_deploy.runtime.trt_build import import_tensorrt

        import_tensorrt()
    written: list[str] = []
    model, gate, report = req.model, None, {}
    if req.precision != "fp32":
        from hsnet_deploy.calibration import make_variant

        meta, gate = make_variant(
            req.model, req.variant_path, req.precision, calib_dir=req.calib_data, calib_episodes=req.calib_episodes,
            gate_episodes=req.gate_episodes, seed=req.seed, fold=req.fold, backend=req.backend,
            quantize=req.quantize, calib_method=req.calib_method, thresholds=req.thresholds,
            keep_fp32=req.fp16_keep)
        written.append(req.variant_path)
        report = gate.to_dict()
        if req.backend == "onnxruntime":  # the caller's one "Wrote" line says it
            return BuildResult(written, report, gate, f"{req.precision} variant for ONNX Runtime, gate passed, "
                                                      f"{meta.get('seconds', 0):.0f} s")
        step(f"Wrote {req.variant_path} ({req.precision}, gate passed, {meta.get('seconds', 0):.0f}s)")
        model = req.variant_path
    if req.backend == "onnxruntime":
        from hsnet_deploy.runtime.ort_build import build_ort_model

        step(f"Optimising {model} with ONNX Runtime for {req.device} ...")
        meta = build_ort_model(model, req.output, req.device)
        return BuildResult([req.output], {k: v for k, v in meta.items() if k != "stages"}, None,
                           f"ONNX Runtime {meta['ort_version']}, {req.device}, {meta['ort_optimization']} optimisations")
    from hsnet_deploy.runtime.trt_build import build_engine as trt_build_engine

    cache = req.timing_cache or str(CACHE_DIR / "trt-timing.cache")
    Path(cache).parent.mkdir(parents=True, exist_ok=True)
    step(f"Building a TensorRT plan from {model} (B <= {req.max_batch}, K <= {req.max_shots}) ...")
    sidecar = trt_build_engine(model, req.output, max_batch=req.max_batch, max_shots=req.max_shots,
                               opt_batch=req.opt_batch, opt_shots=req.opt_shots, workspace_gib=req.workspace_gib,
                               timing_cache_path=cache, version_compatible=req.version_compatible, tf32=req.tf32)
    facts = ", ".join(f"{k} {sidecar[k]}" for k in ("tensorrt_version", "gpu_name", "compute_capability") if k in sidecar)
    return BuildResult([*written, req.output, f"{req.output}.json"],
                       report or {k: v for k, v in sidecar.items() if k != "stages"}, gate, f"TensorRT plan ({facts})")
