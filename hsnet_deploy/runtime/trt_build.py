"""ONNX -> TensorRT plan, written for the TensorRT 10.x and 11.x Python APIs.

Precision lives in the ONNX (FP16 = mixed-precision ONNX, INT8 = explicit Q/DQ), so the network is
always strongly typed and no precision flag or calibrator is ever set: TensorRT 11 removed them, and
10.x gives the same engine through the same path. The plan is written unmodified (trtexec and other
loaders read it as is); its metadata goes to the sidecar `<plan>.json` (shared/docs/contract.md).

`build_engine` is a sequence of small steps (network, parse, config, profile, timing cache, build,
sidecar), each one testable against a fake `tensorrt` module. `tensorrt` is imported inside functions
only: importing this module costs nothing on a machine without it.
"""

from __future__ import annotations

import hashlib
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType

from hsnet_deploy.artifacts import (
    check_output_path,
    sha256_file,
    tool_versions,
    write_bytes_atomic,
    write_json_atomic,
)
from hsnet_deploy.errors import UserError
from hsnet_deploy.runtime.base import INPUT_NAMES, OUTPUT_NAMES, input_shapes
from hsnet_deploy.runtime.trt_common import (
    BUILDER_NOTE,
    TRT_INSTALL,
    check_symmetric_int8,
    cuda_device_info,
    make_logger,
    sidecar_path,
    version_tuple,
)

# --------------------------------------------------------------------------- lazy import


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
    """The model's metadata (through runtime.artifact.read_onnx_meta, the one reader), its fixed H and W,
    and the contract's output names, without loading external weights."""
    import onnx

    from hsnet_deploy.runtime.artifact import read_onnx_meta

    path = Path(onnx_path)
    if not path.is_file():
        raise UserError(f"{path}: no such ONNX file")
    meta = read_onnx_meta(path)  # readable, hsnet-deploy metadata, the contract's inputs
    graph = onnx.load(str(path), load_external_data=False).graph
    outputs = {o.name for o in graph.output}
    missing = [n for n in OUTPUT_NAMES if n not in outputs]
    if missing:
        raise UserError(f"{path}: missing output {', '.join(missing)}; expected {', '.join(OUTPUT_NAMES)} "
                        f"(got {sorted(outputs)})")
    dims = next(i for i in graph.input if i.name == "query_img").type.tensor_type.shape.dim
    if len(dims) != 4:
        raise UserError(f"{path}: query_img has rank {len(dims)}, expected (B, 3, H, W)")
    height, width = (d.dim_value if d.HasField("dim_value") else 0 for d in dims[2:])
    if height <= 0 or width <= 0:
        raise UserError(f"{path}: query_img H and W must be fixed at export, got {dims[2]} x {dims[3]}")
    check_symmetric_int8(path, meta, "build the INT8 variant for TensorRT from the FP32 export with "
                         "`build-engine --int8 --backend tensorrt`")
    return OnnxSpec(height=height, width=width, meta=meta)


def profile_shapes(
    height: int, width: int, *, max_batch: int, max_shots: int, opt_batch: int, opt_shots: int
) -> dict[str, tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]]:
    """(min, opt, max) per input: one profile over B in [1, max_batch] and K in [1, max_shots]."""

    lo, opt, hi = (input_shapes(b, k, height, width) for b, k in ((1, 1), (opt_batch, opt_shots),
                                                                  (max_batch, max_shots)))
    return {name: (lo[name], opt[name], hi[name]) for name in INPUT_NAMES}


def check_build_args(
    max_batch: int, max_shots: int, opt_batch: int, opt_shots: int, workspace_gib: float
) -> None:
    """Refuse a profile or workspace TensorRT would reject, before any file is read."""
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


# --------------------------------------------------------------------------- the build, step by step


def parse_onnx(trt: ModuleType, network: object, logger: object, onnx_path: str | os.PathLike,
               *, version_compatible: bool = False, config: object = None) -> object:
    """Fill `network` from the ONNX file; a parse failure names the file, TensorRT's version and each node."""
    parser = trt.OnnxParser(network, logger)
    if version_compatible:
        set_version_compatible(trt, config, parser)
    # parse_from_file resolves external-data weights relative to the ONNX file.
    if not parser.parse_from_file(str(Path(onnx_path).resolve())):
        errors = "; ".join(parser_error_text(parser.get_error(i)) for i in range(parser.num_errors))
        raise UserError(f"{onnx_path}: TensorRT {trt.__version__} cannot parse the model: {errors}")
    return parser


def configure(trt: ModuleType, config: object, *, workspace_gib: float, tf32: bool) -> None:
    """Workspace limit and TF32; nothing else: precision comes from the strongly typed network."""
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(workspace_gib * (1 << 30)))
    set_tf32(trt, config, tf32)


def add_profile(builder: object, config: object, shapes: dict) -> None:
    """One optimisation profile over B and K (H and W are fixed)."""
    profile = builder.create_optimization_profile()
    for name, (lo, opt, hi) in shapes.items():
        profile.set_shape(name, lo, opt, hi)
    config.add_optimization_profile(profile)


def attach_timing_cache(config: object, path: Path | None) -> object | None:
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


def save_timing_cache(config: object, path: Path) -> None:
    """Write the cache the build filled (atomically: a concurrent build never reads half a cache)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    write_bytes_atomic(path, memoryview(config.get_timing_cache().serialize()))


def build_plan(trt: ModuleType, builder: object, network: object, config: object, logger: object,
               onnx_path: str | os.PathLike) -> memoryview:
    """The serialized plan, or a RuntimeError quoting TensorRT's last errors."""
    plan = builder.build_serialized_network(network, config)
    if plan is None:
        detail = "; ".join(logger.errors[-5:]) or "see the TensorRT log above"
        raise RuntimeError(f"TensorRT {trt.__version__} failed to build {onnx_path}: {detail}")
    return memoryview(plan)


def plan_meta(spec: OnnxSpec, onnx_path: str | os.PathLike, plan: memoryview, *, trt_version: str,
              gpu: tuple[str, str], version_compatible: bool, tf32: bool, batch: tuple[int, int, int],
              shots: tuple[int, int, int], workspace_gib: float) -> dict:
    """The sidecar: the ONNX's metadata plus what the plan is tied to (TensorRT version, GPU, profile)."""
    meta = dict(spec.meta)
    meta.setdefault("img_size", spec.height)
    onnx_tools = meta.get("tool_versions") if isinstance(meta.get("tool_versions"), dict) else {}
    meta.update(
        artifact="tensorrt-plan",
        source_onnx=Path(onnx_path).name,
        source_onnx_sha256=sha256_file(onnx_path),
        tensorrt_version=trt_version,
        gpu_name=gpu[0],
        compute_capability=gpu[1],
        version_compatible=bool(version_compatible),
        tf32=bool(tf32),
        profile={"batch": list(batch), "shots": list(shots)},
        input_hw=[spec.height, spec.width],
        workspace_gib=workspace_gib,
        plan_bytes=plan.nbytes,
        plan_sha256=hashlib.sha256(plan).hexdigest(),
        tool_versions={**onnx_tools, **tool_versions(tensorrt=trt_version)},
    )
    return meta


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
    `version_compatible` the plan runs on later TensorRT versions and on the lean runtime
    (tensorrt-lean-cu13), at some speed cost. Both files are written atomically.
    """
    check_build_args(max_batch, max_shots, opt_batch, opt_shots, workspace_gib)
    spec = read_onnx_spec(onnx_path)
    out = check_output_path(out_path)
    check_output_path(sidecar_path(out))
    cache_path = Path(timing_cache_path) if timing_cache_path is not None else None
    trt = import_tensorrt()
    gpu = cuda_device_info()
    shapes = profile_shapes(spec.height, spec.width, max_batch=max_batch, max_shots=max_shots,
                            opt_batch=opt_batch, opt_shots=opt_shots)

    logger = make_logger(trt)
    builder = trt.Builder(logger)
    network = builder.create_network(strongly_typed_flags(trt))
    config = builder.create_builder_config()
    parse_onnx(trt, network, logger, onnx_path, version_compatible=version_compatible, config=config)
    configure(trt, config, workspace_gib=workspace_gib, tf32=tf32)
    add_profile(builder, config, shapes)
    cache = attach_timing_cache(config, cache_path)
    plan = build_plan(trt, builder, network, config, logger, onnx_path)
    if cache is not None:
        save_timing_cache(config, cache_path)

    meta = plan_meta(spec, onnx_path, plan, trt_version=trt.__version__, gpu=gpu,
                     version_compatible=version_compatible, tf32=tf32, batch=(1, opt_batch, max_batch),
                     shots=(1, opt_shots, max_shots), workspace_gib=workspace_gib)
    # Plan first, sidecar second: an interruption in between leaves a sidecar whose plan_sha256 no
    # longer matches, which the runner reports instead of running a plan with the wrong metadata.
    write_bytes_atomic(out, plan)
    write_json_atomic(sidecar_path(out), meta)
    return meta
