"""One index over an ONNX graph for every pass that walks it (FP16 keep-lists, INT8 placement and its
checks, BatchNorm folding): which node makes a tensor, which nodes read it, which names are constants.
Built once per pass from the graph as it is; a pass that edits the graph builds a new one."""

from __future__ import annotations

from dataclasses import dataclass

import onnx


@dataclass(frozen=True)
class GraphIndex:
    producer: dict[str, onnx.NodeProto]
    consumers: dict[str, list[onnx.NodeProto]]
    initializers: dict[str, onnx.TensorProto]
    constants: frozenset[str]  # initializer names and Constant node outputs

    @classmethod
    def of(cls, model: onnx.ModelProto | onnx.GraphProto) -> GraphIndex:
        graph = model.graph if isinstance(model, onnx.ModelProto) else model
        producer: dict[str, onnx.NodeProto] = {}
        consumers: dict[str, list[onnx.NodeProto]] = {}
        for node in graph.node:
            for out in node.output:
                producer[out] = node
            for name in node.input:
                consumers.setdefault(name, []).append(node)
        inits = {i.name: i for i in graph.initializer}
        consts = set(inits) | {o for n in graph.node if n.op_type == "Constant" for o in n.output}
        return cls(producer, consumers, inits, frozenset(consts))

    def readers(self, name: str) -> list[onnx.NodeProto]:
        return self.consumers.get(name, [])

    def made_by(self, name: str, op_type: str) -> bool:
        """Whether tensor `name` is the output of a node of type `op_type`."""
        node = self.producer.get(name)
        return node is not None and node.op_type == op_type
