"""Run a TensorRT plan behind the common Runner interface, with the full or the lean runtime.

Before anything touches the GPU, the sidecar `<plan>.json` is checked against the runtime in hand
(`check_engine_compatible`): a plan from another TensorRT version or another GPU architecture is a
clear UserError, never a crash inside deserialisation. Device buffers come from cuda-python, or from
torch CUDA tensors where torch has CUDA: nothing here needs a compiled extension (no pycuda).
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from types import ModuleType

import numpy as np

from hsnet_deploy.errors import UserError
from hsnet_deploy.runtime.base import INPUT_NAMES, OUTPUT_NAMES, Runner, RunnerInfo
from hsnet_deploy.runtime.trt_common import (
    BUILDER_NOTE,
    CUDA_INSTALL,
    TRT_INSTALL,
    TRT_LEAN_INSTALL,
    cuda_check,
    cuda_device_info,
    import_cudart,
    make_logger,
    version_tuple,
)

# Major-version pairs a version-compatible plan may cross (TensorRT 11.4.1 support matrix, "Engine
# Portability"): 8 -> 10 and 10 -> 11 only. Within a major, a later minor runs an earlier one's plan.
CROSS_MAJOR_VERSION_COMPATIBLE = {(8, 10), (10, 11)}

# Axis names for shape messages, in the contract's axis order.
AXES = {
    "query_img": ("batch B", "channels", "height", "width"),
    "support_imgs": ("batch B", "shots K", "channels", "height", "width"),
    "support_masks": ("batch B", "shots K", "height", "width"),
}


# --------------------------------------------------------------------------- pure checks


def check_engine_compatible(
    engine_path: str | os.PathLike,
    meta: dict,
    *,
    runtime_version: str,
    compute_capability: str,
    lean: bool = False,
    gpu_name: str = "",
) -> None:
    """Refuse, with a UserError naming the file and both values, a plan this runtime cannot run.

    Plans are tied to the TensorRT version that built them unless built version-compatible (then a
    later minor of the same major, or the next supported major, runs them); the lean runtime runs
    version-compatible plans only. Without hardware compatibility a plan runs only on the compute
    capability it was built for.
    """
    path = str(engine_path)
    built = meta.get("tensorrt_version")
    built_cc = meta.get("compute_capability")
    if not built or not built_cc:
        raise UserError(
            f"{path}: its sidecar {path}.json lacks tensorrt_version / compute_capability; "
            "rebuild the engine with `hsnet-deploy build-engine --backend tensorrt`"
        )
    vc = bool(meta.get("version_compatible"))
    if lean and not vc:
        raise UserError(
            f"{path}: built with TensorRT {built} without --version-compatible, but only the TensorRT lean "
            f"runtime {runtime_version} is installed, which runs version-compatible plans only; rebuild with "
            f"--version-compatible or install the full TensorRT {built}: {TRT_INSTALL}"
        )
    b, r = version_tuple(built), version_tuple(runtime_version)
    if not vc and b != r:
        raise UserError(
            f"{path}: built with TensorRT {built}, this runtime is TensorRT {runtime_version}; a plan runs "
            f"only on the TensorRT version that built it unless built with --version-compatible: rebuild "
            f"the engine with TensorRT {runtime_version} or install TensorRT {built}"
        )
    if vc and not _version_compatible_runs(b, r):
        raise UserError(
            f"{path}: version-compatible plan built with TensorRT {built} cannot run on TensorRT "
            f"{runtime_version}: such plans run on the same or a later release of their major version "
            f"(and TensorRT 8 -> 10, 10 -> 11), never on an older one; rebuild the engine with "
            f"TensorRT {runtime_version}"
        )
    if str(built_cc) != str(compute_capability):
        built_gpu = meta.get("gpu_name") or "?"
        raise UserError(
            f"{path}: built for compute capability {built_cc} ({built_gpu}), this GPU is compute capability "
            f"{compute_capability} ({gpu_name or '?'}); a TensorRT plan runs only on the GPU architecture it "
            "was built for: rebuild the engine on this GPU"
        )


def _version_compatible_runs(built: tuple[int, ...], runtime: tuple[int, ...]) -> bool:
    if not built or not runtime or runtime[:3] < built[:3]:
        return False
    return runtime[0] == built[0] or (built[0], runtime[0]) in CROSS_MAJOR_VERSION_COMPATIBLE


def check_feed_shapes(
    engine_path: str | os.PathLike,
    shapes: dict[str, tuple[int, ...]],
    profile: dict[str, tuple[tuple[int, ...], tuple[int, ...]]],
) -> None:
    """Refuse input shapes outside the engine's optimisation profile, naming the axis (B, K, H, W).

    `profile` maps each input to its (min, max) shape. B must agree across the inputs and K across
    the supports, which TensorRT would otherwise only report as a failed execution.
    """
    for name, (lo, hi) in profile.items():
        if name not in shapes:
            raise UserError(f"missing input {name!r} (expected {', '.join(profile)})")
        shape = tuple(int(d) for d in shapes[name])
        axes = AXES.get(name, tuple(f"axis {i}" for i in range(len(lo))))
        if len(shape) != len(lo):
            raise UserError(
                f"{name}: shape {shape} has rank {len(shape)}, expected {len(lo)} ({', '.join(axes)})"
            )
        for axis, (d, a, z) in enumerate(zip(shape, lo, hi, strict=True)):
            if a <= d <= z:
                continue
            label = axes[axis]
            if label in ("height", "width"):
                raise UserError(
                    f"{name}: image size {shape[-2]}x{shape[-1]}, but {engine_path} was built for "
                    f"{hi[-2]}x{hi[-1]}; resize the inputs or rebuild the engine at this size"
                )
            flag = {"batch B": " (rebuild with a larger --max-batch)",
                    "shots K": " (rebuild with a larger --max-shots)"}
            allowed = f"[{a}, {z}]" if a != z else f"{a}"
            raise UserError(
                f"{name}: {label} = {d} is outside {engine_path}'s profile {allowed}{flag.get(label, '')}"
            )
    batches = {n: int(shapes[n][0]) for n in profile if n in AXES}
    if len(set(batches.values())) > 1:
        raise UserError(f"inputs disagree on batch B: {batches}")
    shots = {n: int(shapes[n][1]) for n in profile if n in ("support_imgs", "support_masks")}
    if len(set(shots.values())) > 1:
        raise UserError(f"support inputs disagree on shots K: {shots}")


# --------------------------------------------------------------------------- lazy imports


def import_trt_runtime() -> tuple[ModuleType, bool]:
    """(`tensorrt`, False), or (`tensorrt_lean`, True) when only the lean runtime is installed."""
    try:
        import tensorrt as trt

        return trt, False
    except (ImportError, OSError):
        pass
    try:
        import tensorrt_lean as trt_lean

        return trt_lean, True
    except (ImportError, OSError):
        pass
    raise UserError(
        f"TensorRT is not installed: to run engines install {TRT_INSTALL}, or for version-compatible "
        f"engines only the lean runtime: {TRT_LEAN_INSTALL}. Note: {BUILDER_NOTE}."
    )


# --------------------------------------------------------------------------- device memory


class _CudaPythonMemory:
    """Device buffers and one stream through cuda-python's runtime API (pageable host copies)."""

    def __init__(self, rt: ModuleType) -> None:
        self.rt = rt
        self._stream = cuda_check(rt.cudaStreamCreate())
        self.stream_handle = int(self._stream)

    def malloc(self, nbytes: int) -> int:
        return int(cuda_check(self.rt.cudaMalloc(nbytes)))

    def free(self, ptr: int) -> None:
        cuda_check(self.rt.cudaFree(ptr))

    def h2d(self, ptr: int, host: np.ndarray) -> None:
        kind = self.rt.cudaMemcpyKind.cudaMemcpyHostToDevice
        cuda_check(self.rt.cudaMemcpyAsync(ptr, host.ctypes.data, host.nbytes, kind, self._stream))

    def d2h(self, host: np.ndarray, ptr: int) -> None:
        kind = self.rt.cudaMemcpyKind.cudaMemcpyDeviceToHost
        cuda_check(self.rt.cudaMemcpyAsync(host.ctypes.data, ptr, host.nbytes, kind, self._stream))

    def synchronize(self) -> None:
        cuda_check(self.rt.cudaStreamSynchronize(self._stream))

    def close(self) -> None:
        if self._stream is not None:
            cuda_check(self.rt.cudaStreamDestroy(self._stream))
            self._stream = None


class _TorchMemory:
    """The same four operations on torch CUDA tensors, for machines with CUDA torch and no cuda-python."""

    def __init__(self, torch: ModuleType) -> None:
        self.torch = torch
        self._stream = torch.cuda.Stream()
        self.stream_handle = int(self._stream.cuda_stream)
        self._tensors: dict[int, object] = {}

    def malloc(self, nbytes: int) -> int:
        tensor = self.torch.empty(nbytes, dtype=self.torch.uint8, device="cuda")
        self._tensors[tensor.data_ptr()] = tensor
        return tensor.data_ptr()

    def free(self, ptr: int) -> None:
        self._tensors.pop(ptr, None)

    def _bytes(self, host: np.ndarray) -> object:
        return self.torch.from_numpy(host.reshape(-1).view(np.uint8))

    def h2d(self, ptr: int, host: np.ndarray) -> None:
        with self.torch.cuda.stream(self._stream):
            self._tensors[ptr][: host.nbytes].copy_(self._bytes(host), non_blocking=True)

    def d2h(self, host: np.ndarray, ptr: int) -> None:
        with self.torch.cuda.stream(self._stream):
            self._bytes(host).copy_(self._tensors[ptr][: host.nbytes])

    def synchronize(self) -> None:
        self._stream.synchronize()

    def close(self) -> None:
        self._tensors.clear()


def _device_memory() -> _CudaPythonMemory | _TorchMemory:
    rt = import_cudart()
    if rt is not None:
        return _CudaPythonMemory(rt)
    try:
        import torch

        if torch.cuda.is_available():
            return _TorchMemory(torch)
    except ImportError:
        pass
    raise UserError(
        f"TensorRT needs device buffers from cuda-python ({CUDA_INSTALL}) or a CUDA build of torch"
    )


# --------------------------------------------------------------------------- TensorRT 10 vs 11


def engine_device_memory(engine: object) -> int:
    """Device memory an execution context needs.

    11.x removed ICudaEngine.device_memory_size (TensorRT 10.x -> 11.x Python migration guide, "Removed
    Python APIs"); device_memory_size_v2 exists from 10.1 on and is the one to use there too.
    """
    size = getattr(engine, "device_memory_size_v2", None)
    return int(size if size is not None else engine.device_memory_size)


def allow_embedded_runtime(runtime: object) -> None:
    """A version-compatible plan embeds the lean runtime (host code): 10.x and 11.x loaders, full or lean,
    refuse it unless `engine_host_code_allowed` is set. Only plans this toolkit built are loaded so."""
    runtime.engine_host_code_allowed = True


# --------------------------------------------------------------------------- the runner


class TensorRTRunner(Runner):
    """A TensorRT plan plus its sidecar metadata; one execution context and one stream while active."""

    def __init__(self, engine_path: str | os.PathLike, meta: dict) -> None:
        super().__init__()
        self.engine_path = Path(engine_path)
        self.info = RunnerInfo.from_metadata(
            "tensorrt", "cuda", meta, str(self.engine_path),
            {"built_with": meta.get("tensorrt_version"), "version_compatible": bool(meta.get("version_compatible"))},
            default_precision="unknown")
        self._reset()

    def _reset(self) -> None:
        self._trt: ModuleType | None = None
        self._logger = None
        self._runtime = None
        self._engine = None
        self._context = None
        self._memory: _CudaPythonMemory | _TorchMemory | None = None
        self._buffers: dict[str, tuple[int, int]] = {}  # name -> (device pointer, capacity in bytes)
        self._inputs: list[str] = []
        self._outputs: list[str] = []
        self._dtypes: dict[str, np.dtype] = {}
        self._profile: dict[str, tuple[tuple[int, ...], tuple[int, ...]]] = {}

    def activate_impl(self) -> None:
        try:
            self._activate()
        except BaseException:
            self.deactivate_impl()
            raise

    def _activate(self) -> None:
        trt, lean = import_trt_runtime()
        gpu_name, cc = cuda_device_info()
        check_engine_compatible(self.engine_path, self.meta, runtime_version=trt.__version__,
                                compute_capability=cc, lean=lean, gpu_name=gpu_name)
        plan = self._read_plan()
        self._memory = _device_memory()
        self._trt, self._logger = trt, make_logger(trt)
        self._runtime = trt.Runtime(self._logger)
        if self._runtime is None:
            raise RuntimeError(f"TensorRT {trt.__version__}: no runtime created: {self._logger.errors}")
        if self.meta.get("version_compatible"):
            allow_embedded_runtime(self._runtime)
        self._engine = self._runtime.deserialize_cuda_engine(plan)
        if self._engine is None:
            detail = "; ".join(self._logger.errors[-3:]) or "see the TensorRT log above"
            raise UserError(
                f"{self.engine_path}: TensorRT {trt.__version__} cannot deserialize the plan: {detail}"
            )
        self._context = self._engine.create_execution_context()
        if self._context is None:
            raise RuntimeError(f"{self.engine_path}: no execution context: {self._logger.errors}")
        self._read_io(trt)
        self.info.details.update(
            runtime="tensorrt_lean" if lean else "tensorrt", tensorrt_version=trt.__version__, gpu=gpu_name
        )

    def _read_plan(self) -> bytes:
        if not self.engine_path.is_file():
            raise UserError(f"{self.engine_path}: no such TensorRT engine")
        plan = self.engine_path.read_bytes()
        expected = self.meta.get("plan_sha256")
        if expected and hashlib.sha256(plan).hexdigest() != expected:
            raise UserError(
                f"{self.engine_path}: the plan does not match its sidecar {self.engine_path}.json "
                "(plan_sha256 differs); rebuild the engine"
            )
        return plan

    def _read_io(self, trt: ModuleType) -> None:
        engine = self._engine
        for i in range(engine.num_io_tensors):
            name = engine.get_tensor_name(i)
            is_input = engine.get_tensor_mode(name) == trt.TensorIOMode.INPUT
            (self._inputs if is_input else self._outputs).append(name)
            self._dtypes[name] = np.dtype(trt.nptype(engine.get_tensor_dtype(name)))
            if is_input:
                lo, _, hi = engine.get_tensor_profile_shape(name, 0)
                self._profile[name] = (tuple(lo), tuple(hi))
        if sorted(self._inputs) != sorted(INPUT_NAMES) or sorted(self._outputs) != sorted(OUTPUT_NAMES):
            raise UserError(
                f"{self.engine_path}: engine I/O {self._inputs} -> {self._outputs} is not the contract's "
                f"{list(INPUT_NAMES)} -> {list(OUTPUT_NAMES)}"
            )

    def _buffer(self, name: str, nbytes: int) -> int:
        """Reuse the tensor's device buffer, growing it (never shrinking) when a larger shape comes."""
        ptr, capacity = self._buffers.get(name, (0, 0))
        if capacity < nbytes:
            if ptr:
                self._memory.free(ptr)
                del self._buffers[name]
            capacity = max(nbytes, 256)
            ptr = self._memory.malloc(capacity)
            self._buffers[name] = (ptr, capacity)
        return ptr

    def infer_impl(self, feed: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        context, memory = self._context, self._memory
        check_feed_shapes(self.engine_path, {n: np.shape(a) for n, a in feed.items()}, self._profile)
        for name in self._inputs:
            host = np.ascontiguousarray(feed[name], dtype=self._dtypes[name])
            if not context.set_input_shape(name, host.shape):
                raise UserError(f"{name}: TensorRT refused shape {host.shape} for {self.engine_path}")
            ptr = self._buffer(name, host.nbytes)
            memory.h2d(ptr, host)  # pageable copy: `host` may be freed once this returns
            context.set_tensor_address(name, ptr)
        outputs = {}
        for name in self._outputs:
            shape = tuple(context.get_tensor_shape(name))
            if any(d < 0 for d in shape):
                raise RuntimeError(f"{self.engine_path}: output {name} has unresolved shape {shape}")
            outputs[name] = np.empty(shape, dtype=self._dtypes[name])
            context.set_tensor_address(name, self._buffer(name, outputs[name].nbytes))
        if not context.execute_async_v3(memory.stream_handle):
            raise RuntimeError(f"{self.engine_path}: execute_async_v3 failed: {self._logger.errors[-3:]}")
        for name, host in outputs.items():
            memory.d2h(host, self._buffers[name][0])
        memory.synchronize()
        return outputs

    def device_memory_bytes(self) -> int | None:
        """The engine's activation memory plus this runner's I/O buffers (weights live in the engine too)."""
        if self._engine is None:
            return None
        return engine_device_memory(self._engine) + sum(cap for _, cap in self._buffers.values())

    def deactivate_impl(self) -> None:
        """Free buffers, then context, engine and runtime in that order (each must outlive the next)."""
        memory = self._memory
        if memory is not None:
            try:
                memory.synchronize()
            finally:
                for ptr, _ in self._buffers.values():
                    memory.free(ptr)
                self._buffers.clear()
        self._context = None
        self._engine = None
        self._runtime = None
        if memory is not None:
            memory.close()
        self._reset()
