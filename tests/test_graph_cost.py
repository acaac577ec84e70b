import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from hsnet_deploy.artifacts import props_to_meta, stage_of_node
from hsnet_deploy.export.cost import node_costs, summarise
from hsnet_deploy.export.stages import node_stages

F32, F16 = 4, 2


def _toy_graph() -> onnx.ModelProto:
    """query_img (B,3,8,8) -> Transpose -> Reshape to (B,3,4,16) -> Conv -> Relu -> Cast(fp16) -> logits.

    The Reshape target is computed from Shape(query_img), as the dynamo exporter does for dynamic B."""
    weight = numpy_helper.from_array(np.ones((4, 3, 3, 3), np.float32), "w")
    rest = numpy_helper.from_array(np.array([3, 4, 16], np.int64), "rest")
    nodes = [
        helper.make_node("Transpose", ["query_img"], ["t"], perm=[0, 1, 3, 2], name="transpose"),
        helper.make_node("Shape", ["query_img"], ["shape"], start=0, end=1, name="shape"),
        helper.make_node("Concat", ["shape", "rest"], ["target"], axis=0, name="concat"),
        helper.make_node("Reshape", ["t", "target"], ["r"], name="reshape"),
        helper.make_node("Conv", ["r", "w"], ["c"], pads=[1, 1, 1, 1], name="conv"),
        helper.make_node("Relu", ["c"], ["y"], name="relu"),
        helper.make_node("Cast", ["y"], ["logits"], to=TensorProto.FLOAT16, name="cast"),
    ]
    graph = helper.make_graph(
        nodes, "toy", [helper.make_tensor_value_info("query_img", TensorProto.FLOAT, ["B", 3, 8, 8])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT16, ["B", 4, 4, 16])], [weight, rest])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 20)])


@pytest.mark.parametrize("batch", [1, 3])
def test_bytes_per_node_match_hand_count(batch):
    costs = {c.name: c for c in node_costs(_toy_graph(), batch, 1)}
    image = batch * 3 * 8 * 8 * F32
    out = batch * 4 * 8 * 8
    assert (costs["transpose"].bytes_read, costs["transpose"].bytes_written) == (image, image)
    assert costs["transpose"].kind == "memory" and costs["transpose"].bytes_moved == 2 * image
    assert costs["reshape"].kind == "view" and costs["reshape"].bytes_moved == 0
    assert costs["conv"].kind == "compute"
    assert costs["conv"].bytes_read == image + 4 * 3 * 3 * 3 * F32 and costs["conv"].bytes_written == out * F32
    assert costs["relu"].bytes_moved == 2 * out * F32
    assert costs["cast"].bytes_moved == out * F32 + out * F16
    total = summarise(list(costs.values()))["total"]
    assert total.memory_bytes == 2 * image + 2 * out * F32 + out * (F32 + F16)
    assert total.nodes == {"compute": 1, "view": 1, "memory": 3}


def test_unlabelled_nodes_take_a_neighbours_stage():
    proto = _toy_graph()
    stages = node_stages(proto, {"conv": "learner", "transpose": "correlation"})
    assert stages["conv"] == "learner"
    assert stages["relu"] == "learner" and stages["cast"] == "learner"  # produced by labelled nodes
    assert stages["reshape"] == "correlation"  # its first labelled producer
    assert stages["shape"] == stages["concat"] == "correlation"  # no labelled producer: the stage of their consumer
    assert node_stages(proto, {})["relu"] == "other"


def test_exported_model_cost_scales_with_batch_and_covers_every_stage(exported):
    path, _, _ = exported("resnet50")
    proto = onnx.load(str(path))
    stage_of = stage_of_node(props_to_meta({p.key: p.value for p in proto.metadata_props}))
    one = summarise(node_costs(proto, 1, 1, stage_of))
    two = summarise(node_costs(proto, 2, 1, stage_of))
    for stage in ("backbone", "correlation", "learner", "decoder"):
        assert one[stage].nodes["compute"] > 0
        # Every tensor of these stages carries B (the weights are read by convs, not memory nodes).
        assert two[stage].memory_bytes == pytest.approx(2 * one[stage].memory_bytes, rel=0.02)
    assert one["total"].memory_bytes == sum(one[s].memory_bytes for s in one if s != "total")


def _scoped(op: str, name: str, inputs: list[str], outputs: list[str], scopes: list[str] | None) -> onnx.NodeProto:
    node = helper.make_node(op, inputs, outputs, name=name)
    if scopes is not None:
        prop = node.metadata_props.add()
        prop.key, prop.value = "pkg.torch.onnx.name_scopes", repr(scopes)
    return node


def test_label_stages_takes_the_innermost_scope_and_lists_first_outputs():
    """A node inside the learner's decoder is 'decoder' (the decoder scope is also inside 'model.hpn_learner');
    unscoped glue follows the span rule; each stage lists its nodes and their first outputs."""
    from hsnet_deploy.export.stages import label_stages

    learner = ["", "model", "model.hpn_learner"]
    nodes = [
        _scoped("Conv", "bb", ["x"], ["f"], ["", "model", "model.backbone"]),
        _scoped("MatMul", "corr", ["f", "f"], ["corr_c4"], None),  # unscoped: pyramid not complete yet
        _scoped("Conv", "enc", ["corr_c4"], ["e"], learner),
        _scoped("Relu", "glue", ["e"], ["g"], None),  # unscoped, after the pyramid, before the decoder
        _scoped("Conv", "dec", ["g"], ["d"], [*learner, "model.hpn_learner.decoder"]),
        _scoped("Resize", "up", ["d"], ["logits"], ["", "model", "model.output_resize"]),
        _scoped("ArgMax", "vote", ["logits"], ["mask"], None),
    ]
    graph = helper.make_graph(nodes, "g", [], [])
    groups = label_stages(helper.make_model(graph), ("corr_c4",), "logits")
    assert groups["backbone"] == ["bb", "f"]
    assert groups["correlation"] == ["corr", "corr_c4"]
    assert groups["learner"] == ["enc", "e", "glue", "g"]
    assert groups["decoder"] == ["dec", "d", "up", "logits"]
    assert groups["other"] == ["vote", "mask"]
