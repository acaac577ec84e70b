"""Memory traffic of an ONNX graph's layout and elementwise nodes, read off shape inference.

On a GPU, HSNet's exported graph spends most of its time in the Transposes, copies, reductions and
elementwise ops around the convolutions, each its own kernel reading and writing a large 4D tensor. The
bytes those nodes move are a measure of that cost that needs no GPU, so graph changes can be steered and
checked on a CPU. Convolutions and MatMuls (plain or quantised) are the compute and are counted apart.

Views (Reshape, Squeeze, Unsqueeze, Flatten, Identity) count as nodes but move nothing: ONNX Runtime
aliases their output to their input buffer. Every other node reads each input once and writes each output
once; initializers count as reads.
"""

from __future__ import annotations

import copy
from collections import defaultdict
from dataclasses import dataclass, field

import numpy as np
import onnx

from hsnet_deploy.export.stages import STAGES, node_stages

COMPUTE_OPS = frozenset({
    "Conv", "ConvTranspose", "MatMul", "Gemm", "FusedConv", "FusedMatMul",
    "QLinearConv", "QLinearMatMul", "ConvInteger", "MatMulInteger",
})
VIEW_OPS = frozenset({"Reshape", "Squeeze", "Unsqueeze", "Flatten", "Identity"})


@dataclass
class NodeCost:
    name: str
    op: str
    stage: str
    bytes_read: int
    bytes_written: int

    @property
    def kind(self) -> str:
        """'compute' (convs, MatMuls), 'view' (no copy) or 'memory' (layout and elementwise work)."""
        if self.op in COMPUTE_OPS:
            return "compute"
        return "view" if self.op in VIEW_OPS else "memory"

    @property
    def bytes_moved(self) -> int:
        return 0 if self.kind == "view" else self.bytes_read + self.bytes_written


@dataclass
class StageCost:
    """Per stage: node counts by kind and the bytes moved by its memory (non-compute, non-view) nodes."""

    nodes: dict[str, int] = field(default_factory=lambda: {"compute": 0, "view": 0, "memory": 0})
    memory_bytes: int = 0
    compute_bytes: int = 0
    memory_bytes_by_op: dict[str, int] = field(default_factory=dict)

    def to_dict(self) -> dict:
        return {"nodes": dict(self.nodes), "memory_bytes": self.memory_bytes, "compute_bytes": self.compute_bytes,
                "memory_bytes_by_op": dict(sorted(self.memory_bytes_by_op.items(), key=lambda kv: -kv[1]))}


class ShapeInferenceError(RuntimeError):
    """Shape inference left some tensor's shape unknown, so its bytes cannot be counted."""


def with_fixed_inputs(proto: onnx.ModelProto, batch: int, shots: int) -> onnx.ModelProto:
    """A copy whose contract inputs have B and K fixed: axis 0 of every input is B, axis 1 of the support
    inputs is K. Inferred shapes already stored in the model are dropped so inference starts afresh."""
    model = copy.deepcopy(proto)
    del model.graph.value_info[:]
    for inp in model.graph.input:
        dims = inp.type.tensor_type.shape.dim
        fixed = {0: batch, 1: shots} if inp.name.startswith("support") else {0: batch}
        for axis, value in fixed.items():
            dims[axis].ClearField("dim_param")
            dims[axis].dim_value = value
    for out in model.graph.output:
        out.type.tensor_type.ClearField("shape")
    return model


def _infer(model: onnx.ModelProto) -> onnx.ModelProto:
    """Shapes everywhere for fixed B and K.

    The exported graph computes some Slice bounds and Reshape targets from Shape nodes, which ONNX's
    inference cannot follow; onnxslim's constant folding (with its fusions off, so the tensor work is
    left as it is) turns that shape arithmetic into constants first. Only tiny shape-valued nodes go.
    """
    import onnxslim
    from onnxslim.core.pattern.registry import DEFAULT_FUSION_PATTERNS

    folded = onnxslim.slim(model, skip_fusion_patterns=list(DEFAULT_FUSION_PATTERNS))
    return onnx.shape_inference.infer_shapes(folded, data_prop=True)


def _tensor_types(model: onnx.ModelProto) -> dict[str, onnx.TypeProto]:
    types = {}
    for vi in (*model.graph.input, *model.graph.value_info, *model.graph.output):
        types[vi.name] = vi.type
    return types


def _static_shape(tp: onnx.TypeProto) -> tuple[int, ...] | None:
    if not tp.tensor_type.HasField("shape"):
        return None
    dims = tp.tensor_type.shape.dim
    if any(not d.HasField("dim_value") for d in dims):
        return None
    return tuple(d.dim_value for d in dims)


def _unknown_tensors(model: onnx.ModelProto) -> list[str]:
    types = _tensor_types(model)
    inits = {i.name for i in model.graph.initializer}
    unknown = []
    for node in model.graph.node:
        for name in node.output:
            if name and name not in inits and (name not in types or _static_shape(types[name]) is None):
                unknown.append(name)
    return unknown


def _nbytes(shape: tuple[int, ...], elem_type: int) -> int:
    itemsize = np.dtype(onnx.helper.tensor_dtype_to_np_dtype(elem_type)).itemsize
    return int(np.prod(shape, dtype=np.int64)) * itemsize


def node_costs(proto: onnx.ModelProto, batch: int, shots: int, stage_map: dict[str, str] | None = None) -> list[NodeCost]:
    """Bytes read and written by every node of `proto` at batch B and K shots, with its stage."""
    model = _infer(with_fixed_inputs(proto, batch, shots))
    unknown = _unknown_tensors(model)
    if unknown:
        raise ShapeInferenceError(f"{len(unknown)} tensors without a static shape, e.g. {unknown[:3]}")
    sizes: dict[str, int] = {}
    for name, tp in _tensor_types(model).items():
        shape = _static_shape(tp)
        if shape is not None and tp.tensor_type.elem_type:
            sizes[name] = _nbytes(shape, tp.tensor_type.elem_type)
    for init in model.graph.initializer:
        sizes[init.name] = _nbytes(tuple(init.dims), init.data_type)
    stages = node_stages(model, stage_map or {})
    return [
        NodeCost(node.name, node.op_type, stages[node.name],
                 sum(sizes.get(i, 0) for i in node.input if i), sum(sizes.get(o, 0) for o in node.output if o))
        for node in model.graph.node
    ]


def summarise(costs: list[NodeCost]) -> dict[str, StageCost]:
    """Stage -> StageCost, in HSNet's stage order, plus 'total'."""
    summary: dict[str, StageCost] = defaultdict(StageCost)
    for cost in costs:
        for key in (cost.stage, "total"):
            stage = summary[key]
            stage.nodes[cost.kind] += 1
            if cost.kind == "memory":
                stage.memory_bytes += cost.bytes_moved
                stage.memory_bytes_by_op[cost.op] = stage.memory_bytes_by_op.get(cost.op, 0) + cost.bytes_moved
            elif cost.kind == "compute":
                stage.compute_bytes += cost.bytes_read + cost.bytes_written
    return {s: summary[s] for s in (*STAGES, "total") if s in summary}
