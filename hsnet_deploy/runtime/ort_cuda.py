"""ONNX Runtime on CUDA: the CUDA EP's options, and I/O bound once to fixed device buffers per (B, K).

A CUDA graph replays the kernels it captured with the device addresses it captured, so ONNX Runtime can
only capture a run whose inputs and outputs sit at the same addresses on every call. Binding host arrays
per call (`bind_cpu_input`) gives new addresses each time, which is what crashed the old `--cuda-graph`.
Here each (B, K) gets its own device buffers and IOBinding, made once; a call copies the new inputs into
those buffers in place and replays that shape's graph (ONNX Runtime's `gpu_graph_id` run option, one id
per shape; ONNX Runtime itself does not check that an id keeps its shape, so this module does).

Two ways in:
- host I/O (`run_host`): numpy in, numpy out; buffers are ONNX Runtime OrtValues, filled by `update_inplace`.
- device I/O (`run_device`): CUDA tensors in (torch, or anything with `__dlpack__`), torch tensors out; the
  tensors are bound by their device pointer, so GPU pre-processing pays no host round trip. With a graph the
  caller's tensors are copied device-to-device into the fixed buffers.

Written to ONNX Runtime's documented Python API (OrtValue, IOBinding, RunOptions) and tested against a fake
of that API on the CPU; the real-GPU tests skip without onnxruntime-gpu and a GPU.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from hsnet_deploy.errors import UserError
from hsnet_deploy.runtime.base import INPUT_NAMES, OUTPUT_NAMES, input_shapes

# The CUDA EP options this project exposes, with the values ONNX Runtime accepts, and the defaults chosen by
# measurement on an H200 (docs/benchmarks.md, "GPU, H200"): HEURISTIC algorithm choice was as fast as
# EXHAUSTIVE at B = 1 and faster at B = 8, with a 3-5x shorter cold call; TF32 convolutions were 1.4x faster
# with 0.99999 mask agreement and 1.5e-3 relative logit error, as PyTorch and TensorRT run FP32 convolutions
# by default. use_tf32=0 gives strict FP32 (the parity figures, and export verification, use it).
# cuDNN's conv-bias fusion (fuse_conv_bias) is not offered: it gave NaN logits there (ONNX Runtime 1.31.1).
CUDA_EP_CHOICES: dict[str, tuple[str, ...]] = {
    "prefer_nhwc": ("0", "1"),
    "cudnn_conv_algo_search": ("EXHAUSTIVE", "HEURISTIC", "DEFAULT"),
    "use_tf32": ("0", "1"),
    "cudnn_conv_use_max_workspace": ("0", "1"),
}
CUDA_EP_DEFAULTS: dict[str, str] = {
    "prefer_nhwc": "0",
    "cudnn_conv_algo_search": "HEURISTIC",
    "use_tf32": "1",
    "cudnn_conv_use_max_workspace": "1",
}

ONNX_TO_NUMPY = {"tensor(float)": np.float32, "tensor(float16)": np.float16, "tensor(int64)": np.int64,
                 "tensor(int32)": np.int32, "tensor(bool)": np.bool_, "tensor(uint8)": np.uint8}


def parse_ep_options(items: Iterable[str]) -> dict[str, str]:
    """`KEY=VALUE` strings (the CLI's `--cuda-ep-option`) -> a checked dict; anything unknown is a UserError."""
    options: dict[str, str] = {}
    for item in items:
        key, sep, value = item.partition("=")
        key, value = key.strip(), value.strip()
        if not sep or key not in CUDA_EP_CHOICES:
            raise UserError(f"--cuda-ep-option {item!r}: expected KEY=VALUE with KEY one of "
                            f"{', '.join(CUDA_EP_CHOICES)}")
        choices = CUDA_EP_CHOICES[key]
        canonical = value.upper() if key == "cudnn_conv_algo_search" else value
        if canonical not in choices:
            raise UserError(f"--cuda-ep-option {key}={value}: {key} takes one of {', '.join(choices)}")
        options[key] = canonical
    return options


def cuda_provider_options(overrides: dict[str, str] | None = None, cuda_graph: bool = False) -> dict[str, str]:
    """The CUDA EP's provider options: this project's defaults, the caller's overrides, graph capture."""
    options = dict(CUDA_EP_DEFAULTS)
    options.update(parse_ep_options(f"{k}={v}" for k, v in (overrides or {}).items()))
    if cuda_graph:
        options["enable_cuda_graph"] = "1"
    return options


def check_cuda_graph_request(device: str, providers: Iterable[str], what: str) -> None:
    """Refuse a CUDA-graph run that cannot be captured before anything is loaded."""
    if device != "cuda":
        raise UserError(f"{what}: CUDA graphs need the CUDA device; {device!r} cannot capture one "
                        "(drop --cuda-graph or use --device cuda)")
    if "CUDAExecutionProvider" not in list(providers):
        raise UserError(f"{what}: CUDA graphs need ONNX Runtime's CUDA provider, which is not installed here "
                        "(pip install onnxruntime-gpu)")


SHOWN_NODES = 8


def capture_refusal(what: str, exc: BaseException, off_cuda: list[str] | None = None) -> UserError:
    """ONNX Runtime refuses graph capture when a node runs outside the CUDA EP (CPU-only ops, control flow);
    `off_cuda` names those nodes where a profiled run could tell (`nodes_off_cuda`), the first few of them."""
    first = str(exc).strip().splitlines()[0][:300] if str(exc).strip() else type(exc).__name__
    where = ""
    if off_cuda:
        shown = ", ".join(off_cuda[:SHOWN_NODES])
        more = f" and {len(off_cuda) - SHOWN_NODES} more" if len(off_cuda) > SHOWN_NODES else ""
        where = f"; nodes it runs outside the CUDA EP: {shown}{more}"
    return UserError(f"{what}: ONNX Runtime cannot capture this model in a CUDA graph ({first}){where}; "
                     "run it without --cuda-graph")


def nodes_off_cuda(profile_events: list[dict]) -> list[str]:
    """'name (OpType)' of each node that ONNX Runtime's profile shows running on another EP than CUDA, in
    the order of their first run: what keeps a session from capturing a CUDA graph."""
    seen: dict[str, str] = {}
    for event in profile_events:
        args, name = event.get("args") or {}, str(event.get("name", ""))
        if event.get("cat") == "Node" and name.endswith("_kernel_time") \
                and args.get("provider") not in (None, "CUDAExecutionProvider"):
            seen.setdefault(name.removesuffix("_kernel_time"), str(args.get("op_name", "?")))
    return [f"{name} ({op})" for name, op in seen.items()]


def output_shapes(shapes: dict[str, tuple[int, ...]]) -> dict[str, tuple[int, ...]]:
    """The contract's output shapes from the input shapes: logits (B, K, 2, H, W), mask (B, H, W)."""
    b, k = shapes["support_imgs"][:2]
    h, w = shapes["query_img"][-2:]
    return {"logits": (b, k, 2, h, w), "mask": (b, h, w)}


def feed_shapes(feed: dict[str, Any]) -> dict[str, tuple[int, ...]]:
    missing = [n for n in INPUT_NAMES if n not in feed]
    if missing:
        raise UserError(f"inputs {missing} are missing (the model takes {', '.join(INPUT_NAMES)})")
    shapes = {n: tuple(int(d) for d in feed[n].shape) for n in INPUT_NAMES}
    b, k = shapes["support_imgs"][:2] if len(shapes["support_imgs"]) == 5 else (None, None)
    h, w = shapes["query_img"][-2:]
    expected = input_shapes(b, k, h, w)
    if b is None or any(shapes[n] != expected[n] for n in INPUT_NAMES):
        raise UserError(f"input shapes {shapes} do not fit query (B, 3, H, W), supports (B, K, 3, H, W), "
                        "masks (B, K, H, W)")
    return shapes


@dataclass
class ShapeSlot:
    """One (B, K): its buffers, its IOBinding (bound once), its graph id and run options."""

    key: tuple
    graph_id: int | None
    binding: Any
    run_options: Any
    inputs: dict[str, Any]
    outputs: dict[str, Any]
    runs: int = 0


@dataclass
class FixedIoBinding:
    """Device buffers and IOBindings per shape for one ONNX Runtime CUDA session.

    `cuda_graph` on: every slot gets its own `gpu_graph_id` (1, 2, ...; 0 is ONNX Runtime's own), so ONNX
    Runtime captures one graph per shape on that shape's first runs and replays it after.
    """

    session: Any
    cuda_graph: bool = False
    device_id: int = 0
    what: str = "model"
    tensor_device: str = "cuda"  # where device-I/O tensors live ("cpu" only in tests against a fake session)
    slots: dict[tuple, ShapeSlot] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.input_dtypes = {i.name: ONNX_TO_NUMPY.get(i.type, np.float32) for i in self.session.get_inputs()}
        self.output_dtypes = {o.name: ONNX_TO_NUMPY.get(o.type, np.float32) for o in self.session.get_outputs()}
        missing = [n for n in OUTPUT_NAMES if n not in self.output_dtypes]
        if missing:
            raise UserError(f"{self.what}: outputs {missing} are missing from the model")

    def _run_options(self, graph_id: int | None):
        import onnxruntime as ort

        options = ort.RunOptions()
        if graph_id is not None:
            options.add_run_config_entry("gpu_graph_id", str(graph_id))
        return options

    def _next_graph_id(self) -> int | None:
        return len(self.slots) + 1 if self.cuda_graph else None

    # -- host I/O: OrtValues on the device, filled from numpy in place ------------------------------------
    def host_slot(self, shapes: dict[str, tuple[int, ...]]) -> ShapeSlot:
        key = ("host", *(shapes[n] for n in INPUT_NAMES))
        slot = self.slots.get(key)
        if slot is None:
            import onnxruntime as ort

            binding = self.session.io_binding()
            inputs = {n: ort.OrtValue.ortvalue_from_shape_and_type(list(shapes[n]), self.input_dtypes[n], "cuda",
                                                                  self.device_id) for n in INPUT_NAMES}
            outputs = {n: ort.OrtValue.ortvalue_from_shape_and_type(list(s), self.output_dtypes[n], "cuda",
                                                                   self.device_id)
                       for n, s in output_shapes(shapes).items()}
            for name, value in inputs.items():
                binding.bind_ortvalue_input(name, value)
            for name, value in outputs.items():
                binding.bind_ortvalue_output(name, value)
            graph_id = self._next_graph_id()
            slot = self.slots[key] = ShapeSlot(key, graph_id, binding, self._run_options(graph_id), inputs, outputs)
        return slot

    def run_host(self, feed: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Copy the host inputs into this shape's device buffers, run (or replay), read the outputs back."""
        slot = self.host_slot(feed_shapes(feed))
        for name in INPUT_NAMES:
            slot.inputs[name].update_inplace(np.ascontiguousarray(feed[name], dtype=self.input_dtypes[name]))
        self._run(slot)
        return {name: slot.outputs[name].numpy() for name in OUTPUT_NAMES}

    # -- device I/O: torch CUDA tensors bound by pointer -----------------------------------------------------
    def run_device(self, feed: dict[str, Any]) -> dict[str, Any]:
        """CUDA tensors in (torch or DLPack), torch tensors out, no host copy. Without a graph the caller's
        tensors are bound directly; with one they are copied into this shape's fixed buffers first."""
        import torch

        device = self.tensor_device
        tensors = {n: _as_torch(feed.get(n), n, device, self.input_dtypes[n]) for n in INPUT_NAMES}
        shapes = feed_shapes(tensors)
        if self.cuda_graph:
            slot = self.device_slot(shapes, device)
            for name in INPUT_NAMES:
                slot.inputs[name].copy_(tensors[name])
        else:
            slot = self._unpinned_slot(shapes, tensors, device)
        if device == "cuda":
            torch.cuda.current_stream().synchronize()  # the caller's kernels finish before ONNX Runtime's stream reads
        self._run(slot)
        outs = {name: slot.outputs[name] for name in OUTPUT_NAMES}
        return {n: t.clone() for n, t in outs.items()} if self.cuda_graph else outs

    def device_slot(self, shapes: dict[str, tuple[int, ...]], device: str) -> ShapeSlot:
        key = ("device", *(shapes[n] for n in INPUT_NAMES))
        slot = self.slots.get(key)
        if slot is None:
            inputs = {n: _empty(shapes[n], self.input_dtypes[n], device) for n in INPUT_NAMES}
            outputs = {n: _empty(s, self.output_dtypes[n], device) for n, s in output_shapes(shapes).items()}
            binding = self.session.io_binding()
            self._bind_pointers(binding, inputs, outputs)
            graph_id = self._next_graph_id()
            slot = self.slots[key] = ShapeSlot(key, graph_id, binding, self._run_options(graph_id), inputs, outputs)
        return slot

    def _unpinned_slot(self, shapes, tensors, device: str) -> ShapeSlot:
        outputs = {n: _empty(s, self.output_dtypes[n], device) for n, s in output_shapes(shapes).items()}
        binding = self.session.io_binding()
        self._bind_pointers(binding, tensors, outputs)
        return ShapeSlot(("unpinned",), None, binding, None, tensors, outputs, runs=1)

    def _bind_pointers(self, binding, inputs: dict[str, Any], outputs: dict[str, Any]) -> None:
        for name, t in inputs.items():
            binding.bind_input(name, "cuda", self.device_id, self.input_dtypes[name], list(t.shape), t.data_ptr())
        for name, t in outputs.items():
            binding.bind_output(name, "cuda", self.device_id, self.output_dtypes[name], list(t.shape), t.data_ptr())

    def _run(self, slot: ShapeSlot) -> None:
        try:
            if slot.run_options is None:
                self.session.run_with_iobinding(slot.binding)
            else:
                self.session.run_with_iobinding(slot.binding, slot.run_options)
        except Exception as exc:  # ORT raises untyped errors; a failed first capture is the user's to see
            if slot.runs == 0 and self.cuda_graph:
                raise capture_refusal(self.what, exc) from None
            raise
        slot.runs += 1


def _empty(shape: tuple[int, ...], dtype, device: str):
    import torch

    return torch.empty(shape, dtype=torch.from_numpy(np.zeros((), dtype)).dtype, device=device)


def _as_torch(value: Any, name: str, device: str, dtype):
    """A torch tensor on `device`, contiguous, of the model's dtype; DLPack producers are accepted too."""
    import torch

    if value is None:
        raise UserError(f"device I/O: input {name!r} is missing (the model takes {', '.join(INPUT_NAMES)})")
    if not isinstance(value, torch.Tensor):
        if isinstance(value, np.ndarray) or not hasattr(value, "__dlpack__"):
            raise UserError(f"device I/O: input {name!r} is a {type(value).__name__}; pass a torch tensor or "
                            "any array with __dlpack__ on the GPU (numpy arrays go through infer())")
        value = torch.from_dlpack(value)
    if value.device.type != torch.device(device).type:
        raise UserError(f"device I/O: input {name!r} is on {value.device}, not {device}; use infer() for host arrays")
    want = torch.from_numpy(np.zeros((), dtype)).dtype
    if value.dtype != want:
        raise UserError(f"device I/O: input {name!r} is {value.dtype}, the model takes {want}")
    return value.contiguous()
