"""ONNX -> TensorRT plan, written for the TensorRT 10.x and 11.x Python APIs.

Precision lives in the ONNX (FP16 = mixed-precision ONNX, INT8 = explicit Q/DQ), so the network is
always strongly typed and no precision flag or calibrator is ever set: TensorRT 11 removed them, and
10.x gives the same engine through the same path. The plan is written unmodified (trtexec and other
loaders read it as is); its metadata goes to the sidecar `<plan>.json` (docs/contract.md).

`tensorrt` and `cuda` are imported inside functions only: importing this module costs nothing on a
machine without them.
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType

from hsnet_deploy.artifacts import (
    check_output_path,
    props_to_meta,
    sha256_file,
    tool_versions,
    write_bytes_atomic,
    write_json_atomic,
)
from hsnet_deploy.errors import UserError
from hsnet_deploy.runtime.base import INPUT_NAMES, OUTPUT_NAMES

TRT_INSTALL = 'pip install "hsnet-deploy[tensorrt]" (tensorrt + cuda-python, on a machine with an NVIDIA GPU)'
TRT_LEAN_INSTALL = 'pip install "hsnet-deploy[tensorrt-lean]"  (tensorrt-lean-cu13 + cuda-python)'
BUILDER_NOTE = (
    "the TensorRT builder libraries (tensorrt-cu13-libs / -cu12-libs) download from NVIDIA's own servers, "
    "which this project's machines cannot reach, so engines are built elsewhere"
)
CUDA_INSTALL = "pip install cuda-python"


def sidecar_path(engine_path: str | os.PathLike) -> Path:
    """`model.plan` -> `model.plan.json`: the plan stays byte-for-byte what TensorRT wrote."""
    path = Path(engine_path)
    return path.with_name(path.name + ".json")


# --------------------------------------------------------------------------- lazy imports


def import_tensorrt() -> ModuleType:
    """The full `tensorrt` module (builder + ONNX parser), or a UserError that says how to get it."""
    try:
        import tensorrt as trt
    except (ImportError, OSError) as exc:  # OSError: bindings present but libnvinfer missing
        raise UserError(
            f"TensorRT is not installed or cannot load ({exc}); install it with {TRT_INSTALL}. "
            f"Note: {BUILDER_NOTE}."
        ) from None
    if not hasattr(trt, "Builder"):
        raise UserError(
            f"the installed TensorRT ({getattr(trt, '__file__', '?')}) has no builder; "
            f"install the full package with {TRT_INSTALL}. Note: {BUILDER_NOTE}."
        )
    return trt


def import_cudart() -> ModuleType | None:
    """cuda-python's runtime bindings, or None when cuda-python is absent."""
    try:
        from cuda.bindings import runtime  # cuda-python >= 12.6 (the only name in 13.x)

        return runtime
    except ImportError:
        pass
    try:
        from cuda import cudart  # older cuda-python 11.x / 12.x

        return cudart
    except ImportError:
        return None


def cuda_check(result: tuple) -> object:
    """Unpack a cuda-python `(cudaError_t, value...)` tuple, raising on any error."""
    err, *rest = result
    if int(err) != 0:
        raise RuntimeError(f"CUDA call failed: {err!r}")
    return rest[0] if len(rest) == 1 else (tuple(rest) or None)


def cuda_device_info() -> tuple[str, str]:
    """(name, compute capability like "9.0") of the current CUDA device: what a plan is tied to.

    cuda-python first (the declared dependency), torch.cuda as a fallback; UserError when no GPU is visible.
    """
    rt = import_cudart()
    if rt is not None:
        try:
            device = cuda_check(rt.cudaGetDevice())
            props = cuda_check(rt.cudaGetDeviceProperties(device))
            name = props.name.decode(errors="replace") if isinstance(props.name, bytes) else str(props.name)
            return name.rstrip("\x00").strip(), f"{props.major}.{props.minor}"
        except RuntimeError:
            pass
    try:
        import torch

        if torch.cuda.is_available():
            major, minor = torch.cuda.get_device_capability()
            return torch.cuda.get_device_name(), f"{major}.{minor}"
    except ImportError:
        pass
    hint = "" if rt is not None else f" (for device buffers also: {CUDA_INSTALL})"
    raise UserError(f"no CUDA GPU is visible to this process; TensorRT needs one{hint}")


def make_logger(trt: ModuleType) -> object:
    """A TensorRT logger that prints warnings to stderr and keeps errors, so messages can quote them."""

    class _Logger(trt.ILogger):
        def __init__(self) -> None:
            trt.ILogger.__init__(self)
            self.errors: list[str] = []

        def log(self, severity: object, msg: str) -> None:
            level = int(severity)  # INTERNAL_ERROR=0 < ERROR < WARNING < INFO < VERBOSE
            if level <= int(trt.ILogger.Severity.ERROR):
                self.errors.append(msg)
            if level <= int(trt.ILogger.Severity.WARNING):
                print(f"[TensorRT] {severity.name}: {msg}", file=sys.stderr)

    return _Logger()


# --------------------------------------------------------------------------- TensorRT 10 vs 11


def strongly_typed_flags(trt: ModuleType) -> int:
    """`create_network` flags for a strongly typed network.

    10.x: strong typing is opt-in through NetworkDefinitionCreationFlag.STRONGLY_TYPED (EXPLICIT_BATCH is
    deprecated and ignored since 10.0, so it is not set). 11.x: every network is strongly typed; the flag
    is deprecated and ignored (pyCoreDoc.h, TensorRT main), and may disappear in a later major.
    """
    flag = getattr(trt.NetworkDefinitionCreationFlag, "STRONGLY_TYPED", None)
    if flag is None:
        if version_tuple(trt.__version__)[0] < 11:
            raise UserError(
                f"TensorRT {trt.__version__} has no strongly typed networks; install TensorRT >= 10.12"
            )
        return 0
    return 1 << int(flag)


def set_tf32(trt: ModuleType, config: object, enabled: bool) -> None:
    """TF32 is on by default in both 10.x and 11.x builders; FP32 parity with ONNX Runtime needs it off.

    getattr: the flag is looked up, not assumed, in case a later release drops it.
    """
    flag = getattr(trt.BuilderFlag, "TF32", None)
    if flag is None:
        if enabled:
            raise UserError(f"TensorRT {trt.__version__} has no BuilderFlag.TF32 to enable")
        return
    if enabled:
        config.set_flag(flag)
    else:
        config.clear_flag(flag)


def set_version_compatible(trt: ModuleType, config: object, parser: object) -> None:
    """A plan that later TensorRT versions and the lean runtime can load (same flags in 10.x and 11.x).

    VERSION_COMPATIBLE restricts the plan to lean-runtime operators; with EXCLUDE_LEAN_RUNTIME clear
    (its default, cleared explicitly here) a copy of the lean runtime is embedded, so loaders need
    `engine_host_code_allowed = True` but no separately supplied runtime library. The ONNX parser must
    use the native InstanceNormalization layer (plugins are not version compatible); that flag is on by
    default in 10.x and 11.x and is set again here.
    """
    config.set_flag(trt.BuilderFlag.VERSION_COMPATIBLE)
    config.clear_flag(trt.BuilderFlag.EXCLUDE_LEAN_RUNTIME)
    native_norm = getattr(getattr(trt, "OnnxParserFlag", None), "NATIVE_INSTANCENORM", None)
    if native_norm is not None:
        parser.set_flag(native_norm)


def parser_error_text(error: object) -> str:
    """One line per ONNX parser error, naming the node.

    node_name()/node_operator() exist on IParserError in 10.x and 11.x; node() (an index) is the fallback
    for bindings that lack them.
    """
    name = error.node_name() if hasattr(error, "node_name") else ""
    op = error.node_operator() if hasattr(error, "node_operator") else ""
    where = f"node {name!r}" + (f" ({op})" if op else "") if name else f"node #{error.node()}"
    return f"{where}: {error.desc()}"


# --------------------------------------------------------------------------- ONNX side (no TensorRT)


@dataclass(frozen=True)
class OnnxSpec:
    """What the builder needs from the ONNX file: fixed H, W and the metadata to carry into the sidecar."""

    height: int
    width: int
    meta: dict


def read_onnx_spec(onnx_path: str | os.PathLike) -> OnnxSpec:
    """Check the contract's I/O names and read H, W and metadata_props without loading external weights."""
    import onnx

    path = Path(onnx_path)
    if not path.is_file():
        raise UserError(f"{path}: no such ONNX file")
    try:
        model = onnx.load(str(path), load_external_data=False)
    except Exception as exc:  # noqa: BLE001 - any parse failure is the user's file
        raise UserError(f"{path}: not a readable ONNX model ({exc})") from None
    graph = model.graph
    initializers = {init.name for init in graph.initializer}
    inputs = {i.name: i for i in graph.input if i.name not in initializers}
    outputs = {o.name for o in graph.output}
    missing = [n for n in INPUT_NAMES if n not in inputs] + [n for n in OUTPUT_NAMES if n not in outputs]
    if missing:
        raise UserError(
            f"{path}: missing {', '.join(missing)}; expected inputs {', '.join(INPUT_NAMES)} "
            f"and outputs {', '.join(OUTPUT_NAMES)} (got {sorted(inputs)} -> {sorted(outputs)})"
        )
    dims = inputs["query_img"].type.tensor_type.shape.dim
    if len(dims) != 4:
        raise UserError(f"{path}: query_img has rank {len(dims)}, expected (B, 3, H, W)")
    height, width = (d.dim_value if d.HasField("dim_value") else 0 for d in dims[2:])
    if height <= 0 or width <= 0:
        raise UserError(f"{path}: query_img H and W must be fixed at export, got {dims[2]} x {dims[3]}")
    props = {p.key: p.value for p in model.metadata_props}
    return OnnxSpec(height=height, width=width, meta=props_to_meta(props))


def profile_shapes(
    height: int, width: int, *, max_batch: int, max_shots: int, opt_batch: int, opt_shots: int
) -> dict[str, tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]]:
    """(min, opt, max) per input: one profile over B in [1, max_batch] and K in [1, max_shots]."""

    def shapes(batch: int, shots: int) -> dict[str, tuple[int, ...]]:
        return {
            "query_img": (batch, 3, height, width),
            "support_imgs": (batch, shots, 3, height, width),
            "support_masks": (batch, shots, height, width),
        }

    lo, opt, hi = shapes(1, 1), shapes(opt_batch, opt_shots), shapes(max_batch, max_shots)
    return {name: (lo[name], opt[name], hi[name]) for name in INPUT_NAMES}


def version_tuple(version: str) -> tuple[int, ...]:
    """'10.13.0.35' -> (10, 13, 0, 35); non-numeric tails (rc, post) are dropped."""
    parts = []
    for piece in str(version).split("."):
        digits = len(piece) - len(piece.lstrip("0123456789"))
        if not digits:
            break
        parts.append(int(piece[:digits]))
        if digits < len(piece):
            break
    return tuple(parts)


# --------------------------------------------------------------------------- the build


def _check_build_args(
    max_batch: int, max_shots: int, opt_batch: int, opt_shots: int, workspace_gib: float
) -> None:
    for flag, lo, value, hi in (
        ("--max-batch", 1, max_batch, None),
        ("--max-shots", 1, max_shots, None),
        ("--opt-batch", 1, opt_batch, max_batch),
        ("--opt-shots", 1, opt_shots, max_shots),
    ):
        if int(value) != value or value < lo or (hi is not None and value > hi):
            bound = f"[{lo}, {hi}]" if hi is not None else f">= {lo}"
            raise UserError(f"{flag} {value}: must be an integer {bound}")
    if not workspace_gib > 0:
        raise UserError(f"--workspace {workspace_gib}: must be a positive number of GiB")


def _attach_timing_cache(trt: ModuleType, config: object, path: Path | None) -> object | None:
    """Load the timing cache (if any) so rebuilds skip kernel timing; a stale one starts fresh."""
    if path is None:
        return None
    data = path.read_bytes() if path.is_file() else b""
    cache = config.create_timing_cache(data)
    # A cache from another TensorRT version or GPU is refused by set_timing_cache: start a new one.
    if cache is None or not config.set_timing_cache(cache, ignore_mismatch=False):
        print(f"[hsnet-deploy] {path}: timing cache does not fit this TensorRT/GPU; starting a new one",
              file=sys.stderr)
        cache = config.create_timing_cache(b"")
        config.set_timing_cache(cache, ignore_mismatch=False)
    return cache


def build_engine(
    onnx_path: str | os.PathLike,
    out_path: str | os.PathLike,
    *,
    max_batch: int,
    max_shots: int,
    opt_batch: int = 1,
    opt_shots: int = 1,
    workspace_gib: float,
    timing_cache_path: str | os.PathLike | None,
    version_compatible: bool = False,
    tf32: bool = False,
) -> dict:
    """Build a TensorRT plan from a contract ONNX model; write the plan and `<out>.json`; return the sidecar.

    B and K are dynamic through one optimisation profile; H and W come from the ONNX. With
    `version_compatible` the plan runs on later TensorRT versions and on the 44 MB lean runtime
    (tensorrt-lean-cu13), at some speed cost. Both files are written atomically.
    """
    _check_build_args(max_batch, max_shots, opt_batch, opt_shots, workspace_gib)
    spec = read_onnx_spec(onnx_path)
    out = check_output_path(out_path)
    check_output_path(sidecar_path(out))
    cache_path = Path(timing_cache_path) if timing_cache_path is not None else None
    trt = import_tensorrt()
    gpu_name, compute_capability = cuda_device_info()
    shapes = profile_shapes(spec.height, spec.width, max_batch=max_batch, max_shots=max_shots,
                            opt_batch=opt_batch, opt_shots=opt_shots)

    logger = make_logger(trt)
    builder = trt.Builder(logger)
    network = builder.create_network(strongly_typed_flags(trt))
    parser = trt.OnnxParser(network, logger)
    config = builder.create_builder_config()
    if version_compatible:
        set_version_compatible(trt, config, parser)
    # parse_from_file resolves external-data weights relative to the ONNX file.
    if not parser.parse_from_file(str(Path(onnx_path).resolve())):
        errors = "; ".join(parser_error_text(parser.get_error(i)) for i in range(parser.num_errors))
        raise UserError(f"{onnx_path}: TensorRT {trt.__version__} cannot parse the model: {errors}")

    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(workspace_gib * (1 << 30)))
    set_tf32(trt, config, tf32)
    profile = builder.create_optimization_profile()
    for name, (lo, opt, hi) in shapes.items():
        profile.set_shape(name, lo, opt, hi)
    config.add_optimization_profile(profile)
    cache = _attach_timing_cache(trt, config, cache_path)

    plan = builder.build_serialized_network(network, config)
    if plan is None:
        detail = "; ".join(logger.errors[-5:]) or "see the TensorRT log above"
        raise RuntimeError(f"TensorRT {trt.__version__} failed to build {onnx_path}: {detail}")
    if cache is not None:
        cache_path.parent.mkdir(parents=True, exist_ok=True)
        write_bytes_atomic(cache_path, memoryview(config.get_timing_cache().serialize()))

    plan_bytes = memoryview(plan)
    meta = dict(spec.meta)
    meta.setdefault("img_size", spec.height)
    onnx_tools = meta.get("tool_versions") if isinstance(meta.get("tool_versions"), dict) else {}
    meta.update(
        artifact="tensorrt-plan",
        source_onnx=Path(onnx_path).name,
        source_onnx_sha256=sha256_file(onnx_path),
        tensorrt_version=trt.__version__,
        gpu_name=gpu_name,
        compute_capability=compute_capability,
        version_compatible=bool(version_compatible),
        tf32=bool(tf32),
        profile={"batch": [1, opt_batch, max_batch], "shots": [1, opt_shots, max_shots]},
        input_hw=[spec.height, spec.width],
        workspace_gib=workspace_gib,
        plan_bytes=plan_bytes.nbytes,
        plan_sha256=_sha256(plan_bytes),
        tool_versions={**onnx_tools, **tool_versions(tensorrt=trt.__version__)},
    )
    # Plan first, sidecar second: an interruption in between leaves a sidecar whose plan_sha256 no
    # longer matches, which the runner reports instead of running a plan with the wrong metadata.
    write_bytes_atomic(out, plan_bytes)
    write_json_atomic(sidecar_path(out), meta)
    return meta


def _sha256(data: memoryview) -> str:
    import hashlib

    return hashlib.sha256(data).hexdigest()
