"""The runner interface: one factory (open_artifact), state checked by the base class, facts and stage
profiling through the interface, and no code outside runtime/ naming a runner class."""

import ast
import os
import re
import tempfile
from pathlib import Path

import pytest
from conftest import EXPORT_SIZE, ort_model_from_another_version, run_cli

from hsnet_deploy.runtime.artifact import open_artifact, open_model
from hsnet_deploy.runtime.bench import random_feed

ROOT = Path(__file__).resolve().parents[1]
RUNNER_CLASSES = {"Runner", "TorchRunner", "CompiledTorchRunner", "OrtRunner", "TensorRTRunner"}
RUNNER_MODULES = {"torch_runner", "torch_compile", "ort_runner", "trt_runner"}


def _runner_imports(path: Path) -> list[str]:
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.ImportFrom) and node.module:
            names = {a.name for a in node.names}
            if names & (RUNNER_CLASSES - {"Runner"}) or node.module.rsplit(".", 1)[-1] in RUNNER_MODULES:
                found.append(f"{path.relative_to(ROOT)}:{node.lineno} from {node.module} import {sorted(names)}")
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.rsplit(".", 1)[-1] in RUNNER_MODULES:
                    found.append(f"{path.relative_to(ROOT)}:{node.lineno} import {alias.name}")
    return found


def test_no_module_outside_runtime_imports_a_runner_class():
    files = [p for p in (ROOT / "hsnet_deploy").rglob("*.py") if "runtime" not in p.relative_to(ROOT).parts]
    files += list((ROOT / "benchmarks").rglob("*.py"))
    assert len(files) > 20  # the walk found the package
    offenders = [line for f in files for line in _runner_imports(f)]
    assert not offenders, offenders
    # and the walk does see such an import where one is
    assert _runner_imports(ROOT / "hsnet_deploy" / "runtime" / "artifact.py")


def test_bench_refuses_what_open_artifact_refuses(exported, tmp_path):
    path, _, _ = exported("resnet50")
    stale = ort_model_from_another_version(path, tmp_path / "opt.onnx")
    code, _, err = run_cli("bench", str(stale), "--iters", "1", "--no-stages")
    assert code == 2 and "Error:" in err and "optimised by ONNX Runtime 0.0.1" in err
    assert "Traceback" not in err


def test_runner_facts_come_from_the_interface(exported):
    path, _, model = exported("resnet50")
    runner = open_artifact(path, "cpu")
    assert (runner.info.img_size, runner.info.backbone, runner.info.authors_weights) == (
        EXPORT_SIZE, "resnet50", False)
    assert runner.flop_model() is None  # an ONNX model has no PyTorch module to count with
    eager = open_model(model, "cpu")
    assert eager.info.backbone == "resnet50" and eager.flop_model() is model


def test_base_class_checks_state(exported):
    path, _, _ = exported("resnet50")
    runner = open_artifact(path, "cpu")
    feed = random_feed(1, 1, EXPORT_SIZE)
    with pytest.raises(RuntimeError, match="outside its `with` block"):
        runner.infer(feed)
    with pytest.raises(RuntimeError, match="outside its `with` block"):
        runner.profile_stages(feed)
    runner.deactivate()  # not active: a no-op
    with runner:
        with pytest.raises(RuntimeError, match="already active"):
            runner.activate()
        assert runner.infer(feed)["mask"].shape == (1, EXPORT_SIZE, EXPORT_SIZE)
    assert not runner.active


def test_every_runner_refuses_inputs_outside_the_contract_with_the_same_words(exported):
    """infer never checked its inputs: PyTorch ran uint8 images unnormalised and K = 0 episodes, ONNX Runtime failed
    deep in a Mul node; masks of -1 / 1 gave the two backends different answers. Now both refuse, naming the input."""
    import numpy as np
    import torch

    from hsnet_deploy.errors import UserError

    path, _, model = exported("resnet50")
    feed = random_feed(1, 2, EXPORT_SIZE)
    q, s, m = (feed[n] for n in ("query_img", "support_imgs", "support_masks"))
    cases = [
        ({**feed, "support_imgs": (s * 50).astype(np.uint8)}, "support_imgs: dtype uint8, the model takes float32"),
        ({**feed, "query_img": q.astype(np.float64)}, "query_img: dtype float64"),
        ({**feed, "query_img": np.concatenate([q, q])}, "do not fit query_img (B, 3, H, W)"),
        ({**feed, "support_masks": m[:, :1]}, "support_masks (1, 1, "),
        ({**feed, "support_imgs": s[:, :0], "support_masks": m[:, :0]}, "B = 1, K = 0, H x W"),
        ({"query_img": q[..., :0], "support_imgs": s[..., :0], "support_masks": m[..., :0]}, "x 0: an episode needs"),
        ({**feed, "support_masks": m * 2 - 1}, "support_masks: values from -1 to 1"),
        ({**feed, "support_masks": np.full_like(m, np.nan)}, "support_masks: values from nan"),
        ({k: torch.from_numpy(v) for k, v in feed.items()}, "query_img: a Tensor; infer takes numpy arrays (convert"),
        ({**feed, "extra": q}, "inputs: unknown extra"),
        ({"query_img": q, "support_imgs": s}, "inputs: missing support_masks"),
        ((q, s, m), "infer takes a dict of numpy arrays"),
    ]
    small = random_feed(1, 1, EXPORT_SIZE // 2)
    for runner in (open_artifact(path, "cpu"), open_model(model, "cpu")):
        with runner:
            for bad, message in cases:
                with pytest.raises(UserError, match=re.escape(message)):
                    runner.infer(bad)
            assert runner.inference_times == []  # refused before the timer and the backend
            if runner.fixed_image_size:
                with pytest.raises(UserError, match=f"images are {EXPORT_SIZE // 2}x{EXPORT_SIZE // 2}, the model "
                                                    f"takes {EXPORT_SIZE}x{EXPORT_SIZE}"):
                    runner.infer(small)
            else:  # eager PyTorch takes any valid size
                assert runner.infer(small)["mask"].shape == (1, EXPORT_SIZE // 2, EXPORT_SIZE // 2)
            assert runner.infer({**feed, "support_masks": m * 0.5})["mask"].shape == (1, EXPORT_SIZE, EXPORT_SIZE)


def test_open_artifact_refuses_an_unknown_device_and_a_backbone_the_file_contradicts(exported):
    from hsnet_deploy.errors import UserError

    path, _, _ = exported("resnet50")
    with pytest.raises(UserError, match="device 'gpu': expected auto, cpu or cuda"):
        open_artifact(path, "gpu")  # ran on the CPU, labelled 'onnxruntime-gpu'
    with pytest.raises(UserError, match="records backbone resnet50, but vgg16 was asked for"):
        open_artifact(path, "cpu", backbone="vgg16")
    assert open_artifact(path, "cpu", backbone="resnet50").info.backbone == "resnet50"


def test_stage_profiling_is_one_call_and_leaves_no_temp_dir(exported, tmp_path, monkeypatch):
    path, _, model = exported("resnet50")
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    feed = random_feed(1, 2, EXPORT_SIZE)
    for runner in (open_artifact(path, "cpu"), open_model(model, "cpu")):
        with runner:
            stages = runner.profile_stages(feed)
        # the same stages from either runner, the K-shot vote after the logits as "other", so their bars line up
        assert set(stages) == {"backbone", "correlation", "learner", "decoder", "other"}, (runner.info.label, stages)
        assert all(t >= 0 for t in stages.values()) and sum(stages.values()) > 0
    assert os.listdir(tmp_path) == []


def test_bench_table_fits_80_columns(exported, monkeypatch):
    from hsnet_deploy import console

    path, _, _ = exported("resnet50")
    monkeypatch.setattr(console.out, "width", 80)
    code, out, err = run_cli("bench", str(path), str(path), "--iters", "1", "--warmup", "0")
    assert code == 0, err
    lines = out.splitlines()
    header = next(i for i, line in enumerate(lines) if line.lstrip().startswith("runner"))
    for line in lines:
        assert len(line) <= 80, line
    # every header and every cell whole: no ellipsis, no wrapped cells, header names in one line
    assert "…" not in out
    assert lines[header].split() == ["runner", "mean", "p50", "cold", "ep/s", "peak", "MB", "GFLOP/s", "vs",
                                     "eager"]
    assert lines[header + 1].strip().startswith("─")  # the header is one line: no wrapped names
    rows = []
    for line in lines[header + 2:]:  # the latency table's rows, up to its notes
        if not line.startswith(("torch-", "ort-")):
            break
        rows.append(line)
    assert len(rows) == 3
    assert rows[0].split()[:2] == ["torch-cpu", "fp32"] and rows[1].split()[:3] == ["ort-cpu", "fp32", "[1]"]
    assert all(len(r.split()) >= 9 for r in rows)  # a row that wrapped would be short
    assert f"[1] {path}" in out  # the artifact path sits in a note under the table


@pytest.mark.parametrize("args,message", [
    (["--max-batch", "4"], "--max-batch: for --backend tensorrt, not onnxruntime"),
    (["--workspace", "2"], "--workspace: for --backend tensorrt"),
    (["--backend", "tensorrt", "--device", "cuda"], "--device: for --backend onnxruntime, not tensorrt"),
    (["--fp16", "--calib-method", "entropy"], "--calib-method: for --int8 only; --fp16 would ignore it"),
    (["--calib-data", "."], "--calib-data is used by --int8"),
])
def test_build_engine_refuses_options_its_backend_ignores(exported, tmp_path, args, message):
    path, _, _ = exported("resnet50")
    out = tmp_path / "o.onnx"
    code, _, err = run_cli("build-engine", str(path), *args, "-o", str(out))
    assert code == 2 and "Error:" in err and message in err, err
    assert not out.exists()


def test_artifact_metadata_and_profile_caps_come_from_runner_info(exported):
    """serve caps B and K by a TensorRT plan's profile and predict warns about seeded weights, both from
    runner.info; an ONNX export carries its metadata there too."""
    from hsnet_deploy.runtime.base import RunnerInfo
    from hsnet_deploy.serve.app import batch_limit, shot_limit

    path, _, _ = exported("resnet50")
    runner = open_artifact(path, "cpu")
    assert runner.info.metadata.get("weights") == "seeded-random" and runner.info.metadata["img_size"] == EXPORT_SIZE
    assert runner.info.profile_max("batch") is None
    assert shot_limit(runner, 5) == 5 and batch_limit(runner, 8) == 8

    class Plan:
        info = RunnerInfo("tensorrt", "cuda", "fp16", metadata={"profile": {"batch": [1, 2, 4], "shots": [1, 1, 3]}})

    assert Plan.info.profile_max("batch") == 4 and Plan.info.profile_max("shots") == 3
    assert shot_limit(Plan, 5) == 3 and batch_limit(Plan, 8) == 4 and batch_limit(Plan, 2) == 2


def test_build_engine_is_one_library_call(exported, tmp_path):
    """build-engine's work is hsnet_deploy.build.build: the CLI only parses, checks and prints."""
    from hsnet_deploy.build import BuildRequest, build
    from hsnet_deploy.runtime.artifact import read_onnx_meta

    path, _, _ = exported("resnet50")
    out = tmp_path / "ort.onnx"
    steps = []
    result = build(BuildRequest(str(path), str(out)), step=steps.append)
    assert result.written == [str(out)] and out.is_file() and result.gate is None
    assert result.report["ort_device"] == "cpu" and read_onnx_meta(out)["ort_device"] == "cpu"
    assert steps and "Optimising" in steps[0]
    assert BuildRequest("m.onnx", "p.plan", backend="tensorrt").variant_path == "p.plan.onnx"
    assert BuildRequest("m.onnx", "v.onnx").variant_path == "v.onnx"


def test_a_runner_without_device_io_refuses_infer_device():
    from hsnet_deploy.model import seeded_model

    runner = open_model(seeded_model("resnet50"), "cpu")
    assert not runner.supports_device_io
    with runner, pytest.raises(RuntimeError, match="TorchRunner has no device I/O .*use infer"):
        runner.infer_device({})


def _tiny_onnx(path, props, extra_input=False):
    """test_tensorrt's few-op stand-in with the metadata `props` adds to a resnet50 label (no precision unless
    given) and, with `extra_input`, an input the contract does not have. open_artifact reads metadata and
    inputs only (the session starts on activation)."""
    import onnx
    from onnx import TensorProto, helper
    from test_tensorrt import SIZE, write_tiny_onnx

    write_tiny_onnx(path, props={"hsnet.backbone": "resnet50", "hsnet.img_size": str(SIZE), **props})
    if extra_input:
        model = onnx.load(str(path))
        model.graph.input.append(helper.make_tensor_value_info("prompt", TensorProto.FLOAT, ["B", 8]))
        onnx.save(model, str(path))
    return path


def test_open_artifact_keeps_the_precision_the_file_records(tmp_path):
    """`precision=` names the precision of a model whose metadata does not say (a variant being gated); it never
    relabels one that does."""
    recorded = _tiny_onnx(tmp_path / "fp16.onnx", {"hsnet.precision": "fp16"})
    assert open_artifact(recorded, "cpu", precision="fp32").info.precision == "fp16"
    unlabelled = _tiny_onnx(tmp_path / "plain.onnx", {})
    assert open_artifact(unlabelled, "cpu", precision="int8").info.precision == "int8"


def test_an_onnx_with_inputs_beyond_the_contract_is_refused(tmp_path):
    from hsnet_deploy.errors import UserError

    path = _tiny_onnx(tmp_path / "extra.onnx", {}, extra_input=True)
    with pytest.raises(UserError, match=r"extra.onnx: inputs \['prompt', 'query_img', .*are not HSNet's"):
        open_artifact(path, "cpu")


def test_an_onnx_optimised_for_cuda_is_refused_on_the_cpu(tmp_path):
    from hsnet_deploy.errors import UserError

    path = _tiny_onnx(tmp_path / "opt.onnx", {"hsnet.ort_device": "cuda"})
    with pytest.raises(UserError, match="optimised by ONNX Runtime for cuda; it cannot run on cpu"):
        open_artifact(path, "cpu")


def test_a_tensorrt_plan_is_refused_on_the_cpu_before_tensorrt_is_needed(tmp_path):
    import json

    from hsnet_deploy.errors import UserError

    plan = tmp_path / "e.plan"
    plan.write_bytes(b"plan")
    (tmp_path / "e.plan.json").write_text(json.dumps({"backbone": "resnet50", "img_size": 16}))
    with pytest.raises(UserError, match="e.plan: a TensorRT engine runs on a CUDA GPU only"):
        open_artifact(plan, "cpu")
    assert open_artifact(plan, "cuda").info.backend == "tensorrt"  # made, not activated: no TensorRT needed


def test_a_legacy_pickle_checkpoint_is_recognised_whatever_its_suffix(tmp_path):
    """torch.save's pre-1.6 format is a bare pickle (first byte 0x80), not a zip: still a checkpoint."""
    import torch

    from hsnet_deploy.runtime.artifact import inspect_artifact

    path = tmp_path / "weights.bin"
    torch.save({"w": torch.zeros(2)}, str(path), _use_new_zipfile_serialization=False)
    assert path.read_bytes()[:1] == b"\x80"
    assert inspect_artifact(path).kind == "checkpoint"


def test_feed_check_refuses_a_width_the_model_was_not_exported_for():
    """H right and W wrong is refused as well (the check compares the whole H x W)."""
    import numpy as np

    from hsnet_deploy.errors import UserError
    from hsnet_deploy.runtime.base import check_feed

    feed = {"query_img": np.zeros((1, 3, 16, 24), np.float32), "support_imgs": np.zeros((1, 1, 3, 16, 24), np.float32),
            "support_masks": np.zeros((1, 1, 16, 24), np.float32)}
    check_feed(feed)  # any size is valid where the artifact does not fix it
    with pytest.raises(UserError, match="images are 16x24, the model takes 16x16"):
        check_feed(feed, img_size=16)
