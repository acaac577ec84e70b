"""`hsnet-deploy triton-repo`: each config.pbtxt parses into Triton's own ModelConfig protobuf (tritonclient)
and its inputs, outputs and batching match the artifact."""

import json
import shutil

import onnx
import pytest
from conftest import EXPORT_SIZE, run_cli

model_config_pb2 = pytest.importorskip(
    "tritonclient.grpc.model_config_pb2", reason="Triton's ModelConfig schema: pip install 'tritonclient[grpc]'")
from google.protobuf import text_format


def parse(path) -> "model_config_pb2.ModelConfig":
    return text_format.Parse(path.read_text(), model_config_pb2.ModelConfig())


def by_name(entries) -> dict:
    return {e.name: e for e in entries}


def test_onnx_repo_parses_and_matches_the_artifact(exported, tmp_path):
    artifact = exported("resnet50")[0]
    code, out, err = run_cli("triton-repo", str(artifact), "-o", str(tmp_path / "repo"), "--max-batch", "6",
                             "--instances", "2")
    assert code == 0, err
    # what the container's ONNX Runtime must read, as the file says: IR 10 arrived with ONNX 1.16 (ONNX Runtime 1.18)
    proto = onnx.load(str(artifact), load_external_data=False)
    opset = next(o.version for o in proto.opset_import if o.domain in ("", "ai.onnx"))
    needs = f"must read ONNX IR version {proto.ir_version} and opset {opset}"
    assert needs in " ".join(out.split())
    if proto.ir_version == 10:
        assert "(ONNX Runtime 1.18 or later)" in " ".join(out.split())
    model_dir = tmp_path / "repo" / "hsnet"
    assert (model_dir / "1" / "model.onnx").read_bytes() == artifact.read_bytes()
    config = parse(model_dir / "config.pbtxt")
    assert config.name == "hsnet" and config.platform == "onnxruntime_onnx" and config.max_batch_size == 6
    graph = onnx.load(str(artifact), load_external_data=False).graph
    fp32 = model_config_pb2.DataType.Value("TYPE_FP32")
    s = EXPORT_SIZE
    expected = {"query_img": [3, s, s], "support_imgs": [-1, 3, s, s], "support_masks": [-1, s, s],
                "logits": [-1, 2, s, s], "mask": [s, s]}
    tensors = {**by_name(config.input), **by_name(config.output)}
    assert set(by_name(config.input)) == {i.name for i in graph.input}
    assert set(by_name(config.output)) == {o.name for o in graph.output}
    for value in list(graph.input) + list(graph.output):
        onnx_dims = [d.dim_value if d.HasField("dim_value") else -1 for d in value.type.tensor_type.shape.dim]
        assert onnx_dims[0] == -1  # B: Triton's batch dim, left out of dims
        assert list(tensors[value.name].dims) == onnx_dims[1:] == expected[value.name]
        assert value.type.tensor_type.elem_type == onnx.TensorProto.FLOAT and tensors[value.name].data_type == fp32
    assert list(config.dynamic_batching.preferred_batch_size) == [3, 6]
    assert config.dynamic_batching.max_queue_delay_microseconds == 2000
    group = config.instance_group[0]
    assert group.count == 2 and group.kind == model_config_pb2.ModelInstanceGroup.Kind.Value("KIND_GPU")
    accel = config.optimization.execution_accelerators.gpu_execution_accelerator[0]
    assert accel.name == "tensorrt" and accel.parameters["precision_mode"] == "FP32"


def test_cuda_and_cpu_variants(exported, tmp_path):
    artifact = exported("resnet50")[0]
    assert run_cli("triton-repo", str(artifact), "-o", str(tmp_path / "cuda"), "--accelerator", "cuda")[0] == 0
    accel = parse(tmp_path / "cuda" / "hsnet" / "config.pbtxt").optimization.execution_accelerators
    assert accel.gpu_execution_accelerator[0].name == "cuda"
    # Triton passes these to ONNX Runtime's UpdateCUDAProviderOptions unchanged: its parser takes the enum's
    # names (a numeric "0", Triton's deprecated top-level form, fails there); the measured defaults
    params = dict(accel.gpu_execution_accelerator[0].parameters)
    assert params["cudnn_conv_algo_search"] == "HEURISTIC" and params["use_tf32"] == "1"
    assert set(params) == {"cudnn_conv_algo_search", "use_tf32"}
    assert run_cli("triton-repo", str(artifact), "-o", str(tmp_path / "cpu"), "--kind", "cpu")[0] == 0
    config = parse(tmp_path / "cpu" / "hsnet" / "config.pbtxt")
    assert config.instance_group[0].kind == model_config_pb2.ModelInstanceGroup.Kind.Value("KIND_CPU")
    assert not config.optimization.execution_accelerators.gpu_execution_accelerator
    # an accelerator asked for on CPU instances would be dropped without a word: refused instead
    code, _, err = run_cli("triton-repo", str(artifact), "-o", str(tmp_path / "cpu2"), "--kind", "cpu",
                           "--accelerator", "cuda")
    assert code == 2 and "--accelerator cuda with --kind cpu" in err and not (tmp_path / "cpu2").exists()


def test_plan_repo_takes_the_profile_batch(exported, tmp_path):
    """A plan (bytes never opened here) with its sidecar: tensorrt_plan, B capped by the profile."""
    onnx_path = exported("resnet50")[0]
    plan = tmp_path / "hsnet.plan"
    plan.write_bytes(b"not really a plan: Triton loads it, we only copy it")
    shutil.copyfile(onnx_path, tmp_path / "hsnet.onnx")
    meta = {"backbone": "resnet50", "img_size": EXPORT_SIZE, "precision": "fp16", "source_onnx": "hsnet.onnx",
            "artifact": "tensorrt-plan",
            "profile": {"batch": [1, 1, 4], "shots": [1, 1, 5]}, "tensorrt_version": "10.13.0",
            "gpu_name": "NVIDIA H100 80GB HBM3"}
    (tmp_path / "hsnet.plan.json").write_text(json.dumps(meta))
    code, out, err = run_cli("triton-repo", str(plan), "-o", str(tmp_path / "repo"), "--max-batch", "4")
    assert code == 0, err
    assert "Triton's TensorRT must be 10.13.0, on a NVIDIA H100 80GB HBM3" in " ".join(out.split())
    config = parse(tmp_path / "repo" / "hsnet" / "config.pbtxt")
    assert config.platform == "tensorrt_plan" and config.max_batch_size == 4
    assert (tmp_path / "repo" / "hsnet" / "1" / "model.plan").read_bytes() == plan.read_bytes()
    assert not config.optimization.execution_accelerators.gpu_execution_accelerator
    code, _, err = run_cli("triton-repo", str(plan), "-o", str(tmp_path / "repo2"), "--max-batch", "8")
    assert code == 2 and "built for B up to 4" in err and not (tmp_path / "repo2" / "hsnet" / "config.pbtxt").exists()


def test_refuses_what_triton_cannot_serve(tmp_path):
    ckpt = tmp_path / "model.pt"
    ckpt.write_bytes(b"PK\x03\x04 zip-like")
    code, _, err = run_cli("triton-repo", str(ckpt), "-o", str(tmp_path / "repo"))
    assert code == 2 and "export this checkpoint" in err
    code, _, err = run_cli("triton-repo", str(tmp_path / "missing.onnx"), "-o", str(tmp_path / "repo"))
    assert code == 2 and "not found" in err


def test_an_onnx_runtime_int8_variant_is_not_given_to_tensorrt(exported, tmp_path):
    """uint8 asymmetric Q/DQ (the onnxruntime INT8 scheme) cannot run in TensorRT, which takes zero points of 0:
    refused with the TensorRT accelerator, written for CUDA or CPU instances; a symmetric variant passes."""
    from hsnet_deploy.artifacts import meta_to_props, props_to_meta

    proto = onnx.load(exported("resnet50")[0])

    def variant(name: str, symmetric: bool):
        meta = props_to_meta({p.key: p.value for p in proto.metadata_props})
        meta.update(precision="int8", variant={"backend": "tensorrt" if symmetric else "onnxruntime",
                                               "qdq": {"zero_points_all_zero": symmetric}})
        del proto.metadata_props[:]
        for key, value in meta_to_props(meta).items():
            proto.metadata_props.add(key=key, value=value)
        path = tmp_path / name
        onnx.save(proto, path)
        return path

    asymmetric = variant("ort.int8.onnx", symmetric=False)
    code, _, err = run_cli("triton-repo", str(asymmetric), "-o", str(tmp_path / "trt"))
    assert code == 2 and "TensorRT runs symmetric int8 only" in " ".join(err.split())
    assert not (tmp_path / "trt").exists()
    for option in (["--accelerator", "cuda"], ["--kind", "cpu"]):
        assert run_cli("triton-repo", str(asymmetric), "-o", str(tmp_path / option[1]), *option)[0] == 0
    # the TensorRT builder's own reader refuses it too, before TensorRT is imported (the Python API's path)
    from hsnet_deploy.errors import UserError
    from hsnet_deploy.runtime.trt_build import read_onnx_spec

    with pytest.raises(UserError, match="build-engine --int8 --backend tensorrt"):
        read_onnx_spec(asymmetric)
    symmetric = variant("trt.int8.onnx", symmetric=True)
    assert read_onnx_spec(symmetric).height == EXPORT_SIZE
    assert run_cli("triton-repo", str(symmetric), "-o", str(tmp_path / "sym"))[0] == 0
    params = parse(tmp_path / "sym" / "hsnet" / "config.pbtxt").optimization.execution_accelerators
    assert params.gpu_execution_accelerator[0].parameters["precision_mode"] == "INT8"


def test_a_rewritten_repository_serves_the_model_just_written(exported, tmp_path):
    """Triton serves the highest version folder by default: the config pins version 1, an earlier run's model of the
    other kind in 1/ goes (said), other version folders are named; a mistyped -o and an ARTIFACT inside the
    repository's model folder are refused."""
    artifact = exported("resnet50")[0]
    repo = tmp_path / "repo"
    assert run_cli("triton-repo", str(artifact), "-o", str(repo))[0] == 0
    (repo / "hsnet" / "2").mkdir()
    stale_plan = repo / "hsnet" / "1" / "model.plan"
    stale_plan.write_bytes(b"an earlier plan")
    code, out, err = run_cli("triton-repo", str(artifact), "-o", str(repo))
    assert code == 0, err
    text = " ".join(out.split())
    assert not stale_plan.exists() and f"Removed {stale_plan}" in text
    assert "also holds version folder(s) 2; the config serves version 1 only" in text
    config = parse(repo / "hsnet" / "config.pbtxt")
    assert list(config.version_policy.specific.versions) == [1]
    code, _, err = run_cli("triton-repo", str(artifact), "-o", str(tmp_path / "missing" / "repo"))
    assert code == 2 and f"folder {tmp_path / 'missing'} does not exist" in " ".join(err.split())
    assert not (tmp_path / "missing").exists()
    inside = repo / "hsnet" / "1" / "model.onnx"
    before = inside.read_bytes()
    code, _, err = run_cli("triton-repo", str(inside), "-o", str(tmp_path / "." / "repo"))
    assert code == 2 and "the model folder this command writes" in err and inside.read_bytes() == before


def _fake_plan(tmp_path, batch_max=4):
    plan = tmp_path / "hsnet.plan"
    plan.write_bytes(b"not really a plan: Triton loads it, we only copy it")
    # its source ONNX model moved away: the config takes the contract's dtypes (all FP32)
    meta = {"backbone": "resnet50", "img_size": EXPORT_SIZE, "precision": "fp16", "artifact": "tensorrt-plan",
            "source_onnx": "moved-away.onnx", "profile": {"batch": [1, 1, batch_max], "shots": [1, 1, 5]}}
    (tmp_path / "hsnet.plan.json").write_text(json.dumps(meta))
    return plan


def test_plan_refusals_and_a_batch_of_one(tmp_path):
    """A plan runs on GPU instances only; --instances 0 is refused by the library as by the CLI; with B = 1 the
    preferred batch size is 1 (half of it, 0, is no batch size)."""
    from hsnet_deploy.errors import UserError
    from hsnet_deploy.serve.triton import write_triton_repo

    plan = _fake_plan(tmp_path)
    code, _, err = run_cli("triton-repo", str(plan), "-o", str(tmp_path / "cpu"), "--kind", "cpu", "--max-batch", "4")
    assert code == 2 and "a TensorRT plan runs on a GPU only" in err
    assert not (tmp_path / "cpu" / "hsnet" / "config.pbtxt").exists()
    with pytest.raises(UserError, match="--max-batch and --instances must be at least 1"):
        write_triton_repo(plan, tmp_path / "none", max_batch=2, instances=0)
    assert run_cli("triton-repo", str(plan), "-o", str(tmp_path / "one"), "--max-batch", "1")[0] == 0
    config = parse(tmp_path / "one" / "hsnet" / "config.pbtxt")
    assert config.max_batch_size == 1 and list(config.dynamic_batching.preferred_batch_size) == [1]


def test_a_plan_whose_metadata_names_no_source_model_gets_the_contract_dtypes(tmp_path):
    """Older or hand-written plan metadata without `source_onnx` (or with it empty) still gives a config, every
    tensor FP32 as the contract has them, instead of an internal error."""
    plan = _fake_plan(tmp_path)
    sidecar = tmp_path / "hsnet.plan.json"
    for source in (None, ""):
        meta = json.loads(sidecar.read_text())
        meta.pop("source_onnx", None)
        if source is not None:
            meta["source_onnx"] = source
        sidecar.write_text(json.dumps(meta))
        out = tmp_path / f"repo{source is None}"
        code, _, err = run_cli("triton-repo", str(plan), "-o", str(out), "--max-batch", "4")
        assert code == 0, err
        config = parse(out / "hsnet" / "config.pbtxt")
        dtypes = {t.name: model_config_pb2.DataType.Name(t.data_type) for t in (*config.input, *config.output)}
        assert set(dtypes.values()) == {"TYPE_FP32"} and len(dtypes) == 5


def test_tensorrt_accelerator_parameters_follow_precision_and_workspace():
    """FP16 models get TensorRT's FP16 mode; the workspace is given in bytes (GiB x 2^30)."""
    from hsnet_deploy.serve.triton import INPUTS, OUTPUTS, config_text

    types = {n: "TYPE_FP32" for n in INPUTS + OUTPUTS}
    for precision, mode in (("fp16", "FP16"), ("int8", "INT8"), ("fp32", "FP32")):
        text = config_text("onnxruntime_onnx", 8, types, EXPORT_SIZE, instances=1, kind="KIND_GPU",
                           accelerator="tensorrt", precision=precision, queue_delay_us=100, workspace_gib=2.5)
        config = text_format.Parse(text, model_config_pb2.ModelConfig())
        params = config.optimization.execution_accelerators.gpu_execution_accelerator[0].parameters
        assert params["precision_mode"] == mode
        assert params["max_workspace_size_bytes"] == str(5 * 2**29)  # 2.5 GiB = 2,684,354,560 bytes
