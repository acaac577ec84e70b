"""The one ONNX graph index the FP16, INT8 and BatchNorm passes share."""

import numpy as np
from onnx import TensorProto, helper, numpy_helper

from hsnet_deploy.export.graph_index import GraphIndex


def _graph():
    w = numpy_helper.from_array(np.ones((1, 1, 1, 1), np.float32), "w")
    nodes = [
        helper.make_node("Constant", [], ["c"], value=numpy_helper.from_array(np.float32(2.0))),
        helper.make_node("Conv", ["x", "w"], ["a"], name="conv"),
        helper.make_node("Relu", ["a"], ["b"], name="relu"),
        helper.make_node("Add", ["a", "b"], ["y"], name="add"),
        helper.make_node("Mul", ["y", "c"], ["z"], name="mul"),
    ]
    info = lambda n: helper.make_tensor_value_info(n, TensorProto.FLOAT, None)
    return helper.make_model(helper.make_graph(nodes, "g", [info("x")], [info("z")], [w]))


def test_producers_readers_and_constants():
    index = GraphIndex.of(_graph())
    assert index.producer["a"].name == "conv" and index.producer["z"].name == "mul"
    assert [n.name for n in index.readers("a")] == ["relu", "add"]
    assert index.readers("z") == [] and index.readers("nothing") == []
    assert index.made_by("b", "Relu") and not index.made_by("b", "Conv") and not index.made_by("x", "Conv")
    assert index.constants == {"w", "c"} and set(index.initializers) == {"w"}
    assert GraphIndex.of(_graph().graph).producer.keys() == index.producer.keys()
