"""A fake of the slice of onnxruntime's Python API that the CUDA runner uses, with CUDA-graph semantics.

"Device memory" is host memory: OrtValues own numpy arrays, and buffers bound by pointer (`bind_input` /
`bind_output` with a data_ptr) are read and written through that pointer. Like ONNX Runtime, a session with
`enable_cuda_graph` runs each `gpu_graph_id` normally once, captures it on the next run, and from then on
REPLAYS it: it reads the input buffers and writes the output buffers it captured, whatever is bound now.
So code that rebinds new buffers per call gets stale answers here, as it would on a GPU (or crashes there).
"""

from __future__ import annotations

import ctypes
import types

import numpy as np

ONNX_TYPE = {np.dtype(np.float32): "tensor(float)", np.dtype(np.float16): "tensor(float16)"}
CAPTURE_REFUSAL = ("This session cannot use the graph capture feature as requested by the user as all compute "
                   "graph nodes have not been partitioned to the CUDA EP.")


def fake_model(query: np.ndarray, supports: np.ndarray, masks: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """A stand-in network whose outputs depend on every input: logits (B, K, 2, H, W), mask (B, H, W)."""
    q = query.astype(np.float32).mean(axis=1)  # (B, H, W)
    s = supports.astype(np.float32).mean(axis=2)  # (B, K, H, W)
    logits = np.stack([q[:, None] - masks, s + masks], axis=2).astype(np.float32)
    mask = (logits[:, :, 1] > logits[:, :, 0]).any(axis=1).astype(np.float32)
    return logits, mask


class Counters:
    def __init__(self) -> None:
        self.allocations = 0
        self.runs = 0
        self.captures: list[int] = []
        self.replays = 0


class FakeOrtValue:
    counters = Counters()

    def __init__(self, array: np.ndarray, device: str) -> None:
        self.array = array
        self.device = device

    @classmethod
    def ortvalue_from_shape_and_type(cls, shape, element_type, device_type="cpu", device_id=0):
        cls.counters.allocations += 1
        return cls(np.zeros(tuple(shape), dtype=element_type), device_type)

    @classmethod
    def ortvalue_from_numpy(cls, array, device_type="cpu", device_id=0):
        cls.counters.allocations += 1
        return cls(np.array(array), device_type)

    def update_inplace(self, array: np.ndarray) -> None:
        assert array.shape == self.array.shape and array.dtype == self.array.dtype, "update_inplace keeps the shape"
        np.copyto(self.array, array)

    def numpy(self) -> np.ndarray:
        return self.array.copy()

    def shape(self):
        return list(self.array.shape)


def _view(ptr: int, element_type, shape) -> np.ndarray:
    dtype = np.dtype(element_type)
    n = int(np.prod(shape)) * dtype.itemsize
    return np.ctypeslib.as_array((ctypes.c_byte * n).from_address(ptr)).view(dtype).reshape(tuple(shape))


class FakeIOBinding:
    def __init__(self) -> None:
        self.inputs: dict[str, np.ndarray] = {}
        self.outputs: dict[str, np.ndarray] = {}
        self.device_types: dict[str, str] = {}

    def bind_ortvalue_input(self, name, value: FakeOrtValue) -> None:
        self.inputs[name], self.device_types[name] = value.array, value.device

    def bind_ortvalue_output(self, name, value: FakeOrtValue) -> None:
        self.outputs[name], self.device_types[name] = value.array, value.device

    def bind_input(self, name, device_type, device_id, element_type, shape, buffer_ptr) -> None:
        self.inputs[name], self.device_types[name] = _view(buffer_ptr, element_type, shape), device_type

    def bind_output(self, name, device_type="cpu", device_id=0, element_type=None, shape=None, buffer_ptr=None):
        assert buffer_ptr is not None, "the runner preallocates every output"
        self.outputs[name], self.device_types[name] = _view(buffer_ptr, element_type, shape), device_type

    def bind_cpu_input(self, name, array) -> None:
        raise AssertionError("bind_cpu_input gives a new address per call: CUDA graphs cannot replay it")


class FakeRunOptions:
    def __init__(self) -> None:
        self.config: dict[str, str] = {}

    def add_run_config_entry(self, key: str, value: str) -> None:
        self.config[key] = value


class Arg:
    def __init__(self, name: str, dtype) -> None:
        self.name, self.type = name, ONNX_TYPE[np.dtype(dtype)]


# (node, op, EP) as ONNX Runtime's profiler reports a run of a model with `cpu_nodes`
PLACEMENT = (("mask_size", "Shape", "CPUExecutionProvider"), ("conv_1", "Conv", "CUDAExecutionProvider"),
             ("vote_index", "NonZero", "CPUExecutionProvider"), ("conv_2", "Conv", "CUDAExecutionProvider"))


class FakeSession:
    """`cpu_nodes`: the model has nodes only the CPU EP runs, so ONNX Runtime refuses graph capture; a session
    with SessionOptions.enable_profiling traces each node's EP per run, as ONNX Runtime's does."""

    cpu_nodes = False
    io_dtype = np.float32
    last: FakeSession | None = None

    def __init__(self, path, sess_options=None, providers=None) -> None:
        self.path, self.providers = path, providers
        self.profile_prefix = getattr(sess_options, "profile_file_prefix", None) if getattr(
            sess_options, "enable_profiling", False) else None
        self.events: list[dict] = []
        cuda = next((p for p in providers or [] if isinstance(p, tuple) and p[0] == "CUDAExecutionProvider"), None)
        self.cuda_options = dict(cuda[1]) if cuda else {}
        self.graphs_on = self.cuda_options.get("enable_cuda_graph") == "1"
        if self.graphs_on and self.cpu_nodes:
            raise RuntimeError(f"[ONNXRuntimeError] : 1 : FAIL : {CAPTURE_REFUSAL}")
        self.graph_runs: dict[int, int] = {}
        self.captured: dict[int, tuple[dict, dict]] = {}
        FakeSession.last = self

    def get_inputs(self):
        return [Arg(n, self.io_dtype) for n in ("query_img", "support_imgs", "support_masks")]

    def get_outputs(self):
        return [Arg(n, np.float32) for n in ("logits", "mask")]

    def io_binding(self) -> FakeIOBinding:
        return FakeIOBinding()

    def _profile_run(self) -> None:
        if self.profile_prefix is None:
            return
        placement = PLACEMENT if self.cpu_nodes else [p for p in PLACEMENT if p[2] == "CUDAExecutionProvider"]
        for name, op, provider in placement:
            for suffix in ("_fence_before", "_kernel_time", "_fence_after"):
                self.events.append({"cat": "Node", "name": name + suffix, "args": {"op_name": op, "provider": provider}})
        self.events.append({"cat": "Session", "name": "model_run", "args": {}})

    def end_profiling(self) -> str:
        import json

        assert self.profile_prefix, "end_profiling without enable_profiling"
        path = f"{self.profile_prefix}_fake.json"
        with open(path, "w") as f:
            json.dump(self.events, f)
        return path

    def run_with_iobinding(self, binding: FakeIOBinding, run_options: FakeRunOptions | None = None) -> None:
        counters = FakeOrtValue.counters
        counters.runs += 1
        self._profile_run()
        assert all(d == "cuda" for d in binding.device_types.values()) or not self.graphs_on
        graph_id = int((run_options.config if run_options else {}).get("gpu_graph_id", "0"))
        inputs, outputs = binding.inputs, binding.outputs
        if self.graphs_on and graph_id != -1:
            assert graph_id != 0, "gpu_graph_id 0 is ONNX Runtime's own"
            if graph_id in self.captured:  # replay: the captured addresses, not what is bound now
                inputs, outputs = self.captured[graph_id]
                counters.replays += 1
            else:
                self.graph_runs[graph_id] = self.graph_runs.get(graph_id, 0) + 1
                if self.graph_runs[graph_id] == 2:  # one regular run, then capture
                    self.captured[graph_id] = (dict(inputs), dict(outputs))
                    counters.captures.append(graph_id)
        logits, mask = fake_model(inputs["query_img"], inputs["support_imgs"], inputs["support_masks"])
        assert outputs["logits"].shape == logits.shape and outputs["mask"].shape == mask.shape
        np.copyto(outputs["logits"], logits)
        np.copyto(outputs["mask"], mask)


class FakeSessionOptions:
    def __init__(self) -> None:
        self.log_severity_level = 2
        self.graph_optimization_level = None
        self.intra_op_num_threads = 0


def fake_onnxruntime(available=("CUDAExecutionProvider", "CPUExecutionProvider")) -> types.ModuleType:
    FakeOrtValue.counters = Counters()
    FakeSession.last = None
    module = types.ModuleType("onnxruntime")
    module.__version__ = "0.0-fake"
    module.OrtValue = FakeOrtValue
    module.RunOptions = FakeRunOptions
    module.InferenceSession = FakeSession
    module.SessionOptions = FakeSessionOptions
    module.GraphOptimizationLevel = types.SimpleNamespace(ORT_ENABLE_ALL=99, ORT_ENABLE_EXTENDED=2,
                                                          ORT_ENABLE_BASIC=1, ORT_DISABLE_ALL=0)
    module.get_available_providers = lambda: list(available)
    return module
