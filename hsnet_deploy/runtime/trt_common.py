"""What the TensorRT runner and builder share: install hints, the sidecar's path, cuda-python access,
the GPU's identity, a logger that keeps errors, and version parsing.

`tensorrt` and `cuda` are imported inside functions only: importing this module costs nothing on a
machine without them.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from types import ModuleType

from hsnet_deploy.errors import UserError

TRT_INSTALL = 'pip install "hsnet-deploy[tensorrt]" (tensorrt + cuda-python, on a machine with an NVIDIA GPU)'
TRT_LEAN_INSTALL = 'pip install "hsnet-deploy[tensorrt-lean]"  (tensorrt-lean-cu13 + cuda-python)'
BUILDER_NOTE = (
    "the TensorRT builder libraries (tensorrt-cu13-libs / -cu12-libs) download from NVIDIA's own servers "
    "(pypi.nvidia.com); where that is out of reach, build the plan on a machine that has it"
)
CUDA_INSTALL = "pip install cuda-python"


def sidecar_path(engine_path: str | os.PathLike) -> Path:
    """`model.plan` -> `model.plan.json`: the plan stays byte-for-byte what TensorRT wrote."""
    path = Path(engine_path)
    return path.with_name(path.name + ".json")


def check_symmetric_int8(path: str | os.PathLike, meta: dict, use: str) -> None:
    """TensorRT runs symmetric signed INT8 only (zero points 0). An INT8 variant made for ONNX Runtime's CPU
    (`build-engine --int8 --backend onnxruntime`: uint8 Q/DQ with non-zero zero points, recorded in its metadata)
    is refused here with what to do instead, not after loading TensorRT for a parser error."""
    qdq = (meta.get("variant") or {}).get("qdq") or {}
    if meta.get("precision") == "int8" and qdq.get("zero_points_all_zero") is False:
        raise UserError(
            f"{path}: its INT8 Q/DQ are uint8 with non-zero zero points (ONNX Runtime's scheme, built with "
            f"--backend onnxruntime), and TensorRT runs symmetric int8 only; {use}")


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
