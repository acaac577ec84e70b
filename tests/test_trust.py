"""Commands a user can trust (issue #12): one test per numbered finding, then a table of hostile inputs,
each refused with exit status 2 and an `Error:` that names the culprit, before any work is done."""

from __future__ import annotations

import json
import os
import struct
import zlib
from pathlib import Path

import numpy as np
import onnx
import pytest
from conftest import run_cli
from PIL import Image

from hsnet_deploy.artifacts import write_json_atomic
from hsnet_deploy.calibration.gate import EpisodeGate, GateReport, GateThresholds
from hsnet_deploy.data import preprocess
from hsnet_deploy.errors import UserError
from hsnet_deploy.outputs import unique_names


def _pair(folder: Path, name: str, size=(48, 40), ext="jpg") -> tuple[str, str]:
    rng = np.random.default_rng(len(name))
    Image.fromarray(rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)).save(folder / f"{name}.{ext}")
    mask = np.zeros(size[::-1], np.uint8)
    mask[size[1] // 4: 3 * size[1] // 4, size[0] // 4: 3 * size[0] // 4] = 255
    Image.fromarray(mask).save(folder / f"{name}_mask.png")
    return str(folder / f"{name}.{ext}"), str(folder / f"{name}_mask.png")


def _png_header_only(path: Path, width: int, height: int) -> None:
    """A PNG whose header claims width x height (a decompression bomb's shape) without the pixels."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\x00" * 16))
                     + chunk(b"IEND", b""))


@pytest.fixture(autouse=True)
def _default_pixel_limit():
    yield
    preprocess.set_max_pixels(int(preprocess.DEFAULT_MAX_MEGAPIXELS * 1e6))


def _read_only(monkeypatch, *folders: Path) -> None:
    """Make `folders` read-only for the checks (chmod does not stop root, who runs CI here)."""
    real = os.access
    blocked = {str(Path(f).resolve()) for f in folders}
    monkeypatch.setattr(os, "access", lambda p, mode, **kw: False if (
        str(Path(p).resolve()) in blocked and mode & os.W_OK) else real(p, mode, **kw))


# 1 ---------------------------------------------------------------------------------------------------------


def test_1_no_command_writes_over_its_inputs(exported, tmp_path):
    model, _, _ = exported("resnet50")
    code, _, err = run_cli("build-engine", str(model), "-o", str(model))
    assert code == 2 and f"{model}: -o would write over the input MODEL" in err
    qdir = tmp_path / "q"
    qdir.mkdir()
    s, m = _pair(tmp_path, "s")
    _pair(qdir, "a")
    before = {p.name: p.read_bytes() for p in qdir.iterdir()}
    code, _, err = run_cli("predict", str(model), "--query", str(qdir), "--support", s, m, "-o", str(qdir))
    assert code == 2 and "-o is the --query folder" in err
    assert {p.name: p.read_bytes() for p in qdir.iterdir()} == before
    code, _, err = run_cli("predict", str(model), "--query", s, "--support", s, m, "-o", m)
    assert code == 2 and "would write over the input --support" in err


def test_1_queries_sharing_a_stem_get_their_own_masks(exported, tmp_path):
    assert unique_names([Path("a.jpg"), Path("a.png"), Path("b.jpg")], ".png") == {
        Path("a.jpg"): "a.jpg.png", Path("a.png"): "a.png.png", Path("b.jpg"): "b.png"}
    # `A.png.jpg` -> `A.png.png` and `a.png` -> `a.png.png` are one file on a case-insensitive disk (macOS, Windows)
    for order in ([Path("A.png.jpg"), Path("a.png"), Path("a.jpg")], [Path("a.png"), Path("A.png.jpg"), Path("a.jpg")]):
        names = unique_names(order, ".png")
        assert len({n.lower() for n in names.values()}) == 3, names
    model, _, _ = exported("resnet50")
    qdir = tmp_path / "q"
    qdir.mkdir()
    _pair(qdir, "a", ext="jpg")
    _pair(qdir, "a", size=(40, 32), ext="png")
    for p in qdir.glob("*_mask.png"):
        p.unlink()
    s, m = _pair(tmp_path, "s")
    code, _, err = run_cli("predict", str(model), "--query", str(qdir), "--support", s, m, "-o", str(tmp_path / "o"))
    assert code == 0, err
    sizes = {p.name: Image.open(p).size for p in (tmp_path / "o").iterdir()}
    assert sizes == {"a.jpg.png": (48, 40), "a.png.png": (40, 32)}


# 2 ---------------------------------------------------------------------------------------------------------


def _report(agreement: float, fp32: float, variant: float, thresholds: GateThresholds) -> GateReport:
    report = GateReport("int8", thresholds)
    report.episodes = [EpisodeGate("e", agreement, 0.9999, 0.01, 0.4)]
    report.miou_fp32, report.miou_variant = fp32, variant
    return report


def test_2_gate_with_ground_truth_keeps_the_agreement_thresholds():
    with_gt = GateThresholds.defaults(True)
    assert with_gt.min_mean_agreement == 0.95 and with_gt.min_sign_agreement == 0.999 and with_gt.max_miou_drop == 1.0
    failing = _report(0.948, 0.0, 0.0, with_gt)  # the finding: mIoU drop 0.0 passed a 0.948 agreement
    assert not failing.passed and "mean mask agreement 0.9480" in failing.failures()[0]
    assert not _report(0.948, 60.0, 60.0, with_gt).passed


def test_2_a_reference_that_scores_nothing_cannot_judge():
    report = _report(0.99, 0.0, 0.0, GateThresholds.defaults(True))
    status = {c["name"]: c["status"] for c in report.to_dict()["checks"]}
    assert status["mIoU drop"] == "unable to judge" and status["mean mask agreement"] == "passed"
    assert report.passed  # agreement decides; the mIoU check is not counted as passed
    explicit = _report(0.99, 0.0, 0.0, GateThresholds.defaults(True, max_miou_drop=0.5))
    assert not explicit.passed and "unable to judge" in explicit.failures()[0]
    only_miou = _report(0.99, 0.2, 0.2, GateThresholds(min_mean_agreement=None, min_sign_agreement=None))
    assert not only_miou.passed and "no threshold could judge" in only_miou.failures()[-1]
    assert _report(0.99, 60.0, 58.5, GateThresholds.defaults(True)).failures() == ["mIoU drop 1.5000 (needs <= 1.0)"]


# 3 ---------------------------------------------------------------------------------------------------------


def test_3_user_faults_exit_2_not_internal_error(exported, tmp_path, monkeypatch):
    model, _, _ = exported("resnet50")
    ort_model = tmp_path / "m.ort.onnx"
    proto = onnx.load(str(model), load_external_data=False)
    proto.metadata_props.add(key="hsnet.ort_version", value="1.0")
    onnx.save(proto, str(ort_model))
    code, _, err = run_cli("build-engine", str(ort_model), "--fp16", "-o", str(tmp_path / "f.onnx"))
    assert code == 2 and f"{ort_model}: is an ONNX Runtime-optimised model" in err
    bomb = tmp_path / "bomb.png"
    _png_header_only(bomb, 20000, 20000)
    s, m = _pair(tmp_path, "s")
    code, _, err = run_cli("predict", str(model), "--query", str(bomb), "--support", s, m, "-o", str(tmp_path / "o.png"))
    assert code == 2 and f"Error: {bomb}: image is over 179 megapixels, over the limit" in " ".join(err.split())
    preprocess.set_max_pixels(1000)
    with pytest.raises(ValueError, match="image is 48x40 \\(0.00192 megapixels\\), over the limit of 0.001"):
        preprocess.load_image(s.replace(".jpg", "_mask.png"))
    qdir = tmp_path / "q"
    qdir.mkdir()
    _pair(qdir, "a")
    (tmp_path / "ro").mkdir()
    _read_only(monkeypatch, tmp_path / "ro")
    code, _, err = run_cli("predict", str(model), "--query", str(qdir), "--support", s, m, "-o", str(tmp_path / "ro"))
    assert code == 2 and f"{tmp_path / 'ro'}: -o: folder is not writable" in err


# 4 ---------------------------------------------------------------------------------------------------------


def test_4_large_images_are_reduced_on_read_or_refused(tmp_path):
    preprocess.set_max_pixels(100_000)
    big = tmp_path / "big.jpg"
    Image.new("RGB", (1200, 900), (200, 10, 10)).save(big)
    img = preprocess.load_image(big)
    assert img.width * img.height <= 100_000 and preprocess.original_size(img) == (1200, 900)
    assert img.size == (300, 225)  # 1/4: the largest reduction JPEG decoding offers that fits
    png = tmp_path / "big.png"
    Image.new("L", (400, 300)).save(png)
    with pytest.raises(ValueError, match=r"big.png: image is 400x300 \(0.12 megapixels\), over the limit of 0.1"):
        preprocess.load_image(png)
    small = tmp_path / "small.jpg"
    Image.new("RGB", (200, 100)).save(small)
    assert preprocess.load_image(small).size == (200, 100)  # under the limit: decoded exactly


def test_4_predict_on_a_reduced_query_writes_the_mask_at_the_file_size(exported, tmp_path):
    model, _, _ = exported("resnet50")
    query = tmp_path / "q.jpg"
    Image.new("RGB", (640, 480), (90, 90, 90)).save(query)
    s, m = _pair(tmp_path, "s")
    out, record = tmp_path / "o.png", tmp_path / "o.json"
    code, _, err = run_cli("predict", str(model), "--query", str(query), "--support", s, m, "-o", str(out),
                           "--json", str(record), "--max-megapixels", "0.1")
    assert code == 0, err
    assert Image.open(out).size == (640, 480)
    assert json.loads(record.read_text())["results"][0]["decoded_size"] == [320, 240]


# 5 ---------------------------------------------------------------------------------------------------------


def test_5_outputs_are_checked_before_the_work(exported, tmp_path, monkeypatch):
    from hsnet_deploy.runtime import suite

    model, _, _ = exported("resnet50")
    monkeypatch.setattr(suite, "run_suite", lambda *a, **k: pytest.fail("bench ran before checking --json"))
    code, _, err = run_cli("bench", str(model), "--json", str(tmp_path / "nodir" / "b.json"))
    assert code == 2 and "nodir" in err and "does not exist (--json)" in err
    s, m = _pair(tmp_path, "s")
    for option in ("--overlay", "--json"):
        code, _, err = run_cli("predict", str(model), "--query", s, "--support", s, m, "-o", str(tmp_path / "ok.png"),
                               option, str(tmp_path / "nodir" / "x.png"))
        assert code == 2 and f"does not exist ({option})" in err
        assert not (tmp_path / "ok.png").exists()


# 6 ---------------------------------------------------------------------------------------------------------


def test_6_bench_refuses_two_backbones(exported, tmp_path):
    model, _, _ = exported("resnet50")
    other = tmp_path / "vgg.onnx"
    proto = onnx.load(str(model), load_external_data=False)
    for prop in proto.metadata_props:
        if prop.key == "hsnet.backbone":
            prop.value = "vgg16"
    onnx.save(proto, str(other))
    code, _, err = run_cli("bench", str(model), str(other), "--iters", "1")
    assert code == 2 and f"{other}: a vgg16 model, but" in err and "one backbone per run" in err


def test_6_variant_stage_map_follows_added_and_renamed_nodes():
    from onnx import TensorProto, helper

    from hsnet_deploy.calibration.variant import variant_stages

    def node(op, name, inputs, outputs):
        return helper.make_node(op, inputs, outputs, name=name)

    nodes = [node("Relu", "bb", ["x"], ["a"]),
             node("QuantizeLinear", "a_q", ["a", "s", "z"], ["aq"]), node("DequantizeLinear", "a_dq", ["aq", "s", "z"],
                                                                          ["ad"]),
             node("Relu", "corr", ["ad"], ["b"]), node("Cast", "b_cast", ["b"], ["c"]), node("Relu", "learn", ["c"], ["y"])]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])])
    stages = variant_stages(helper.make_model(graph), {"backbone": ["bb"], "correlation": ["corr"],
                                                       "learner": ["learn"], "other": []})
    labelled = {n: s for s, names in stages.items() for n in names}
    assert labelled["a_q"] == labelled["a_dq"] == "backbone" and labelled["b_cast"] == "correlation"
    assert stages["other"] == []


def test_6_bench_rows_name_files_and_json_records_the_run(exported, tmp_path):
    model, _, _ = exported("resnet50")
    ort_model = tmp_path / "m.ort.onnx"
    code, _, err = run_cli("build-engine", str(model), "-o", str(ort_model))
    assert code == 0, err
    out = tmp_path / "b.json"
    code, stdout, err = run_cli("bench", str(model), str(ort_model), "--iters", "1", "--warmup", "0",
                                "--device", "cpu", "--json", str(out))
    assert code == 0, err
    stage_table = stdout.split("per-stage time")[1]
    # rows are named by a short label and a number; the note under the latency table names each file
    assert f"[1] {model}" in stdout and f"[2] {ort_model}" in stdout
    assert "ort-cpu fp32 [1]" in stage_table and "ort-cpu fp32 [2]" in stage_table
    assert f"Wrote the benchmark as JSON to {out}" in " ".join(err.split())
    data = json.loads(out.read_text())
    assert data["versions"]["onnxruntime"] and data["timestamp"].endswith("Z")
    assert data["settings"]["warmup"] == 0 and data["settings"]["iters"] == 1
    assert data["command"][:3] == ["hsnet-deploy", "bench", str(model)]
    rows = [line.split("  ")[0].strip() for line in stdout.split("per-stage time")[0].splitlines()]
    assert [r["table_label"] for r in data["results"]] == [r for r in rows if r.startswith(("torch-", "ort-"))]


# 7 ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("umask,mode", [(0o022, 0o644), (0o077, 0o600), (0o002, 0o664)])
def test_7_files_keep_the_users_umask(tmp_path, umask, mode):
    old = os.umask(umask)
    try:
        write_json_atomic(tmp_path / "x.json", {"a": 1})
    finally:
        os.umask(old)
    assert (tmp_path / "x.json").stat().st_mode & 0o777 == mode


# 8 ---------------------------------------------------------------------------------------------------------


def test_8_eval_interrupt_says_where_the_state_is_and_how_to_resume(exported, tmp_path, monkeypatch):
    from synthetic_datasets import make_fss

    from hsnet_deploy.data import evaluate as evaluate_module

    model, _, _ = exported("resnet50")
    root = make_fss(tmp_path / "data")

    def interrupted(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(evaluate_module, "evaluate", interrupted)
    code, _, err = run_cli("eval", str(model), "--dataset", "fss", "--data-root", str(root), "--json",
                           str(tmp_path / "r.json"))
    text = " ".join(err.split())
    assert code == 130 and f"saved in {model}.eval-state.json" in text  # beside the artifact, not the JSON
    assert f"hsnet-deploy eval {model} --dataset fss --data-root {root} --json {tmp_path / 'r.json'} --resume" in text
    _read_only(monkeypatch, Path(model).parent)
    code, _, err = run_cli("eval", str(model), "--dataset", "fss", "--data-root", str(root))
    assert code == 2 and "give --state PATH" in err


def test_8_eval_title_has_no_fold_for_fss(exported, tmp_path):
    from synthetic_datasets import make_fss

    model, _, _ = exported("resnet50")
    root = make_fss(tmp_path / "data")
    code, stdout, err = run_cli("eval", str(model), "--dataset", "fss", "--data-root", str(root), "--episodes", "2",
                                "--state", str(tmp_path / "s.json"))
    assert code == 0, err
    assert "FSS-1000, 1-shot, 2 episodes" in stdout and "fold" not in stdout
    assert "SEEDED RANDOM" in err  # item 10: eval says the weights are seeded


# 9 ---------------------------------------------------------------------------------------------------------


def test_9_options_that_would_be_ignored_are_refused(exported, tmp_path):
    model, _, _ = exported("resnet50")
    out = str(tmp_path / "v.onnx")
    code, _, err = run_cli("build-engine", str(model), "--fp16", "--int8", "--calib-data", str(tmp_path), "-o", out)
    assert code == 2 and "--fp16 and --int8 exclude each other" in err
    code, _, err = run_cli("build-engine", str(model), "--calib-data", str(tmp_path), "-o", out)
    assert code == 2 and "--calib-data is used by --int8" in err
    code, _, err = run_cli("bench", str(model), "--cuda-graph", "--device", "cpu")
    assert code == 2 and "--cuda-graph" in err
    s, m = _pair(tmp_path, "s")
    code, _, err = run_cli("predict", str(model), "--query", s, "--support", s, m, "-o", str(tmp_path / "q.jpg"))
    assert code == 2 and "q.jpg: -o: the mask is written as PNG" in err
    assert not list(tmp_path.glob("*.onnx"))


# 10 --------------------------------------------------------------------------------------------------------


def test_10_messages(exported, tmp_path):
    model, _, _ = exported("resnet50")
    s, _m = _pair(tmp_path, "s")
    deep = tmp_path / "deep.png"
    Image.fromarray(np.array([[0, 65535], [300, 0]], dtype=np.uint16).repeat(20, 0).repeat(24, 1)).save(deep)
    code, _, err = run_cli("predict", str(model), "--query", s, "--support", s, str(deep), "-o", str(tmp_path / "o.png"))
    assert code == 2 and err.count(str(deep)) == 1 and "mask values range 0..65535" in err
    code, _, err = run_cli("predict", str(model), "--query", s, "--support", s, "-o", str(tmp_path / "o.png"))
    assert code == 2 and f"--support {s}: its MASK is missing" in err and "Missing option" not in err
    noise = tmp_path / "noise.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (40, 48), dtype=np.uint8)).save(noise)
    code, _, err = run_cli("predict", str(model), "--query", s, "--support", s, str(noise), "-o", str(tmp_path / "o.png"))
    assert code == 0 and f"Warning: {noise}:" in " ".join(err.split()) and "is it a mask?" in err
    assert "SEEDED RANDOM" in err
    package = Path(__file__).resolve().parents[1] / "hsnet_deploy"
    assert not [p for p in package.rglob("*.py") if "project's machines" in p.read_text()]


# 11 --------------------------------------------------------------------------------------------------------


def test_11_info_version_and_help(exported, tmp_path):
    model, report, _ = exported("resnet50")
    code, out, _ = run_cli("--version")
    assert code == 0 and "hsnet-deploy, version" in out and "torch" in out and "onnxruntime" in out
    assert "tensorrt" in out
    code, out, _ = run_cli("info", "--json", str(tmp_path / "env.json"))
    env = json.loads((tmp_path / "env.json").read_text())
    assert code == 0 and "backend onnxruntime" in out and env["backends"]["onnxruntime"]["available"]
    assert "CPUExecutionProvider" in env["backends"]["onnxruntime"]["providers"]
    code, out, _err = run_cli("info", str(model), "--json", str(tmp_path / "m.json"))
    facts = json.loads((tmp_path / "m.json").read_text())
    assert code == 0 and facts["precision"] == "fp32" and facts["metadata"]["backbone"] == "resnet50"
    assert facts["source"]["weights"] == "seeded-random" and facts["versions"]["torch"]
    # export JSON: each node counted once
    assert sum(report.stage_nodes.values()) == report.nodes


def test_11_help_fits_80_columns_and_every_option_explains_itself():
    import click

    from hsnet_deploy.cli import cli

    commands = [None, *cli.commands]
    for name in commands:
        code, out, _ = run_cli(*([name] if name else []), "--help")
        assert code == 0
        long = [line for line in out.splitlines() if len(line) > 80]
        assert not long, (name, long)
    for name, command in cli.commands.items():
        for param in command.params:
            if isinstance(param, click.Option):
                assert param.help, f"{name} {param.opts} has no help"


def test_11_build_engine_json_holds_the_gate_report(exported, tmp_path):
    from hsnet_deploy.calibration.synthetic import write_simple_layout

    model, _, _ = exported("resnet50")
    calib = tmp_path / "calib"
    write_simple_layout(calib, episodes=4, size=64, seed=2)
    out, report = tmp_path / "q.onnx", tmp_path / "gate.json"
    code, stdout, err = run_cli("build-engine", str(model), "--int8", "--calib-data", str(calib), "--calib-episodes",
                                "2", "--gate-episodes", "2", "-o", str(out), "--json", str(report))
    assert code in (0, 1), err
    gate = json.loads(report.read_text())
    assert gate["precision"] == "int8" and len(gate["episodes"]) == 2
    assert {c["name"] for c in gate["checks"]} >= {"mean mask agreement", "sign agreement"}
    assert '"episodes"' not in stdout + err  # the raw report goes to --json, not the terminal
    if code == 0:
        code, info_out, _ = run_cli("info", str(out))
        assert code == 0 and "gate" in info_out and "mean mask agreement" in info_out
        flat = " ".join(info_out.replace("│", " ").split())  # a long path folds the row onto two lines
        assert "quantised stages" in flat and "2 gate episodes (2 with ground truth)" in flat


def test_11_info_shows_how_a_variant_was_made():
    """The layout, the FP32 groups or quantised stages and the episodes: what tells two variants apart."""
    from hsnet_deploy.info import recipe_rows

    fp16 = dict(recipe_rows({"layout": "halo", "variant": {"backend": "tensorrt", "kept_fp32": {
        "mask": {"nodes": 3}, "l2norm": {"nodes": 27}}}, "calibration": {"layout": "synthetic", "seed": 4,
                                                                          "gate_episodes": 16}}))
    assert fp16["export layout"] == "halo" and fp16["kept in FP32"] == "mask (3 nodes), l2norm (27 nodes)"
    assert fp16["episodes"] == "synthetic episodes, seed 4, 16 gate episodes" and "quantised stages" not in fp16
    assert dict(recipe_rows({"variant": {"kept_fp32": {}}}))["kept in FP32"] == "none"
    int8 = dict(recipe_rows({"variant": {"quantized_stages": ["backbone"], "calib_method": "entropy"},
                             "calibration": {"layout": "fss", "root": "/d", "seed": 0, "calib_episodes": 8,
                                             "gate_episodes": 5, "ground_truth": True, "ground_truth_episodes": 3}}))
    assert int8["quantised stages"] == "backbone" and int8["calibration method"] == "entropy"
    assert int8["episodes"] == "/d (fss layout, seed 0): 8 calibration episodes, 5 gate episodes (3 with ground truth)"
    older = dict(recipe_rows({"calibration": {"layout": "simple", "root": "c", "seed": 0, "calib_episodes": 2,
                                              "gate_episodes": 2, "ground_truth": False}}))
    assert older["episodes"] == "c (simple layout, seed 0): 2 gate episodes (0 with ground truth)"
    # an FP16 variant of an earlier release recorded a calibration share it never used: not shown
    fp16_folder = dict(recipe_rows({"variant": {"kept_fp32": {}}, "calibration": {
        "layout": "simple", "root": "c", "seed": 0, "calib_episodes": 3, "gate_episodes": 3}}))
    assert fp16_folder["episodes"] == "c (simple layout, seed 0): 3 gate episodes"
    assert recipe_rows({}) == []


def test_11_piped_tables_follow_columns(exported, tmp_path):
    """Piped output is 160 columns wide unless COLUMNS says otherwise (a person's `| less` at 80)."""
    import subprocess
    import sys

    model, _, _ = exported("resnet50")
    long_name = tmp_path / ("a-model-name-long-enough-to-widen-the-table-past-eighty-columns-" * 2 + ".onnx")
    long_name.symlink_to(model)
    script = "from hsnet_deploy.cli import main; main()"
    widths = {}
    for columns in ("80", None):
        env = {k: v for k, v in os.environ.items() if k != "COLUMNS"} | ({"COLUMNS": columns} if columns else {})
        done = subprocess.run([sys.executable, "-c", script, "info", str(long_name)], capture_output=True, text=True,
                              env=env, timeout=120, check=False)
        assert done.returncode == 0, done.stderr
        widths[columns] = max(len(line) for line in done.stdout.splitlines())
    assert widths["80"] <= 80 < widths[None]


# hostile input ----------------------------------------------------------------------------------------------


@pytest.fixture()
def hostile(tmp_path, exported):
    model, _, _ = exported("resnet50")
    s, m = _pair(tmp_path, "s")
    (tmp_path / "bad.onnx").write_bytes(b"\x08\x07garbage")
    (tmp_path / "bad.jpg").write_bytes(b"\xff\xd8\xff not a jpeg")
    _png_header_only(tmp_path / "bomb.png", 20000, 20000)
    (tmp_path / "adir").mkdir()
    return {"MODEL": str(model), "S": s, "M": m, "T": str(tmp_path)}


HOSTILE = [
    ("export-dir", ["export", "--backbone", "resnet50", "-o", "{T}/adir"], "{T}/adir"),
    ("export-json-is-output", ["export", "--backbone", "resnet50", "-o", "{T}/x.onnx", "--json", "{T}/x.onnx"],
     "{T}/x.onnx"),
    ("export-no-checkpoint", ["export", "--backbone", "resnet50", "--checkpoint", "{T}/none.pt", "-o", "{T}/x.onnx"],
     "none.pt"),
    ("export-bad-layout", ["export", "--backbone", "resnet50", "-o", "{T}/x.onnx", "--layout", "halo,diagonal"],
     "diagonal"),
    ("bench-fuse-conv-bias", ["bench", "{MODEL}", "--cuda-ep-option", "fuse_conv_bias=1"], "fuse_conv_bias=1"),
    ("build-missing", ["build-engine", "{T}/none.onnx", "-o", "{T}/x.onnx"], "none.onnx"),
    ("build-garbage", ["build-engine", "{T}/bad.onnx", "-o", "{T}/x.onnx"], "bad.onnx"),
    ("build-over-input", ["build-engine", "{MODEL}", "-o", "{MODEL}"], "{MODEL}"),
    ("build-json-over-input", ["build-engine", "{MODEL}", "-o", "{T}/x.onnx", "--json", "{MODEL}"], "{MODEL}"),
    ("build-fp16-int8", ["build-engine", "{MODEL}", "--fp16", "--int8", "-o", "{T}/x.onnx"], "--fp16"),
    ("build-calib-alone", ["build-engine", "{MODEL}", "--calib-data", "{T}", "-o", "{T}/x.onnx"], "--calib-data"),
    ("build-int8-no-calib", ["build-engine", "{MODEL}", "--int8", "-o", "{T}/x.onnx"], "--calib-data"),
    ("build-calib-missing", ["build-engine", "{MODEL}", "--int8", "--calib-data", "{T}/nowhere", "-o", "{T}/x.onnx"],
     "nowhere"),
    ("build-out-nodir", ["build-engine", "{MODEL}", "-o", "{T}/nodir/x.onnx"], "nodir"),
    ("bench-missing", ["bench", "{T}/none.onnx"], "none.onnx"),
    ("bench-garbage", ["bench", "{T}/bad.onnx"], "bad.onnx"),
    ("bench-json-nodir", ["bench", "{MODEL}", "--json", "{T}/nodir/b.json"], "nodir"),
    ("bench-json-over-input", ["bench", "{MODEL}", "--json", "{MODEL}"], "{MODEL}"),
    ("bench-cuda-graph-cpu", ["bench", "{MODEL}", "--cuda-graph", "--device", "cpu"], "--cuda-graph"),
    ("eval-no-root", ["eval", "{MODEL}", "--dataset", "fss", "--data-root", "{T}/nowhere"], "nowhere"),
    ("eval-json-over-input", ["eval", "{MODEL}", "--dataset", "fss", "--data-root", "{T}", "--json", "{MODEL}"],
     "{MODEL}"),
    ("eval-state-is-json", ["eval", "{MODEL}", "--dataset", "fss", "--data-root", "{T}", "--json", "{T}/r.json",
                            "--state", "{T}/r.json"], "{T}/r.json"),
    ("predict-bomb", ["predict", "{MODEL}", "--query", "{T}/bomb.png", "--support", "{S}", "{M}", "-o", "{T}/o.png"],
     "bomb.png"),
    ("predict-garbage-image", ["predict", "{MODEL}", "--query", "{T}/bad.jpg", "--support", "{S}", "{M}", "-o",
                               "{T}/o.png"], "bad.jpg"),
    ("predict-bomb-support", ["predict", "{MODEL}", "--query", "{S}", "--support", "{T}/bomb.png", "{M}", "-o",
                              "{T}/o.png"], "bomb.png"),
    ("predict-jpeg-mask", ["predict", "{MODEL}", "--query", "{S}", "--support", "{S}", "{M}", "-o", "{T}/o.jpg"],
     "o.jpg"),
    ("predict-over-query", ["predict", "{MODEL}", "--query", "{T}/q.png", "--support", "{S}", "{M}", "-o",
                            "{T}/q.png"], "{T}/q.png"),
    ("predict-over-support", ["predict", "{MODEL}", "--query", "{S}", "--support", "{S}", "{M}", "-o", "{M}"], "{M}"),
    ("predict-overlay-is-output", ["predict", "{MODEL}", "--query", "{S}", "--support", "{S}", "{M}", "-o",
                                   "{T}/o.png", "--overlay", "{T}/o.png"], "{T}/o.png"),
    ("predict-query-dir-is-output", ["predict", "{MODEL}", "--query", "{T}/adir", "--support", "{S}", "{M}", "-o",
                                     "{T}/adir"], "adir"),
    ("predict-missing-mask", ["predict", "{MODEL}", "--query", "{S}", "--support", "{S}", "-o", "{T}/o.png"], "{S}"),
    ("predict-garbage-model", ["predict", "{T}/bad.onnx", "--query", "{S}", "--support", "{S}", "{M}", "-o",
                               "{T}/o.png"], "bad.onnx"),
    ("predict-zero-pixels", ["predict", "{MODEL}", "--query", "{S}", "--support", "{S}", "{M}", "-o", "{T}/o.png",
                             "--max-megapixels", "0"], "--max-megapixels"),
    ("info-missing", ["info", "{T}/none.onnx"], "none.onnx"),
    ("info-garbage", ["info", "{T}/bad.onnx"], "bad.onnx"),
]


@pytest.mark.parametrize("name,args,culprit", HOSTILE, ids=[h[0] for h in HOSTILE])
def test_hostile_input_exits_2_naming_the_culprit(hostile, name, args, culprit):
    if name == "predict-query-dir-is-output":
        _pair(Path(hostile["T"]) / "adir", "q")
    if name == "predict-over-query":
        Image.new("RGB", (40, 30)).save(Path(hostile["T"]) / "q.png")
    before = sorted(p.name for p in Path(hostile["T"]).rglob("*"))
    code, _, err = run_cli(*[a.format(**hostile) for a in args])
    text = " ".join(err.split())
    assert code == 2, err
    assert "Error:" in text and culprit.format(**hostile) in text and "Traceback" not in text
    assert sorted(p.name for p in Path(hostile["T"]).rglob("*")) == before  # nothing written, nothing replaced


# second audit (2026-11-27) -----------------------------------------------------------------------------------


def test_a_reader_that_leaves_early_loses_the_table_not_the_json(tmp_path):
    """`hsnet-deploy ... --json r.json | head -1`: the closed pipe ends the table, not the command (click exited 1
    without a word, before --json was written)."""
    import subprocess
    import sys

    target = tmp_path / "facts.json"
    proc = subprocess.Popen([sys.executable, "-m", "hsnet_deploy", "info", "--json", str(target)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    proc.stdout.close()  # the reader is gone before the first table line
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err.decode()
    assert json.loads(target.read_text())["versions"]


def test_a_long_label_is_cut_and_the_figures_stay():
    import io

    from rich.console import Console

    from hsnet_deploy.console import table

    console = Console(width=80, file=io.StringIO())
    console.print(table("", ["class", "IoU %"], [("17 " + "x" * 100, 81.5), ("3 dog", 3.25)], width=80))
    lines = console.file.getvalue().splitlines()
    assert max(len(line) for line in lines) <= 80
    assert lines[0].split()[-1] == "%" and lines[2].endswith("81.5") and lines[3].endswith("3.25")
    assert "…" in lines[2] and "3 dog" in lines[3]
    # a label exactly as long as the line leaves it (80 - the figures' column and its gap) is shown whole
    fitting = "17 " + "y" * (80 - len("IoU %") - 3 - 3)
    console = Console(width=80, file=io.StringIO())
    console.print(table("", ["class", "IoU %"], [(fitting, 81.5)], width=80))
    lines = console.file.getvalue().splitlines()
    assert fitting in lines[2] and "…" not in lines[2] and len(lines[2]) <= 80


def test_options_the_artifact_makes_pointless_are_refused(exported, tmp_path):
    model, _, _ = exported("resnet50")
    code, _, err = run_cli("bench", str(model), "--img-size", "128")
    assert code == 2 and "with ARTIFACTs it would be ignored: the run takes the first ONNX" in " ".join(err.split())
    code, _, err = run_cli("bench", "--backbone", "vgg16")
    assert code == 2 and "bench runs the embedded default (resnet50)" in " ".join(err.split())
    s, m = _pair(tmp_path, "s")
    for args in (["bench", str(model)], ["eval", str(model), "--dataset", "fss", "--data-root", str(tmp_path)],
                 ["predict", str(model), "--query", s, "--support", s, m, "-o", str(tmp_path / "q.png")],
                 ["serve", str(model)]):
        code, _, err = run_cli(*args, "--backbone", "vgg16")
        assert code == 2 and "--backbone is for an authors' checkpoint" in err, (args, err)
    assert not (tmp_path / "q.png").exists()


def test_eval_stopped_by_a_bad_file_keeps_the_counted_episodes_and_says_how_to_go_on(exported, tmp_path):
    from synthetic_datasets import make_fss

    model, _, _ = exported("resnet50")
    root = make_fss(tmp_path / "data")  # classes in order Boat, apple, zebra_fish: 10 queries each
    state = tmp_path / "s.json"
    good = (root / "FSS-1000" / "apple" / "1.jpg").read_bytes()
    (root / "FSS-1000" / "apple" / "1.jpg").write_bytes(b"not a jpeg")  # the 11th query, and apple's supports
    args = ["eval", str(model), "--dataset", "fss", "--data-root", str(root), "--state", str(state)]
    code, _, err = run_cli(*args)
    text = " ".join(err.split())
    assert code == 2 and "apple/1.jpg: cannot read image" in text
    assert f"The totals of the 10 episodes before it are saved in {state}" in text and "--resume" in text
    (root / "FSS-1000" / "apple" / "1.jpg").write_bytes(good)
    code, resumed, err = run_cli(*args, "--resume")
    assert code == 0, err
    code, whole, err = run_cli(*args[:-2], "--state", str(tmp_path / "whole.json"))
    assert code == 0, err
    assert resumed.split("mIoU")[1].split()[:3] == whole.split("mIoU")[1].split()[:3]
    (root / "FSS-1000" / "Boat" / "1.jpg").write_bytes(b"not a jpeg")  # the first query: nothing counted
    code, _, err = run_cli(*args)
    assert code == 2 and "saved in" not in err and not state.exists()


def test_ctrl_c_while_the_command_loads_exits_130_without_a_traceback(monkeypatch, capsys):
    import sys

    import tomllib

    from hsnet_deploy.__main__ import run

    class Loading:
        def __getattr__(self, name):
            raise KeyboardInterrupt

    monkeypatch.setitem(sys.modules, "hsnet_deploy.cli", Loading())
    with pytest.raises(SystemExit) as stop:
        run()
    assert stop.value.code == 130 and capsys.readouterr().err == "Interrupted.\n"
    project = tomllib.loads((Path(__file__).resolve().parents[1] / "pyproject.toml").read_text())
    assert project["project"]["scripts"]["hsnet-deploy"] == "hsnet_deploy.__main__:run"


def test_a_gated_variant_given_as_model_is_built_as_it_is(exported, tmp_path):
    """build-engine m.fp16.onnx --backend tensorrt|onnxruntime: the variant's precision travels; only making a variant
    of a variant is refused."""
    from hsnet_deploy.artifacts import meta_to_props, props_to_meta
    from hsnet_deploy.runtime.artifact import read_onnx_meta

    proto = onnx.load(exported("resnet50")[0])
    meta = props_to_meta({p.key: p.value for p in proto.metadata_props}) | {"precision": "fp16"}
    del proto.metadata_props[:]
    onnx.helper.set_model_props(proto, meta_to_props(meta))
    variant = tmp_path / "m.fp16.onnx"  # the FP32 graph labelled FP16: the build does not look inside
    onnx.save(proto, variant)
    code, _, err = run_cli("build-engine", str(variant), "-o", str(tmp_path / "m.fp16.ort.onnx"))
    assert code == 0, err
    assert read_onnx_meta(tmp_path / "m.fp16.ort.onnx")["precision"] == "fp16"
    code, _, err = run_cli("build-engine", str(variant), "--fp16", "-o", str(tmp_path / "again.onnx"))
    assert code == 2 and "is already an FP16 variant; make the FP16 variant from the FP32 export" in err


def test_second_audit_refusals_name_the_option_or_the_file(exported, tmp_path):
    model, _, _ = exported("resnet50")
    calib = tmp_path / "calib"
    calib.mkdir()
    cases = [
        (["build-engine", str(model), "--fp16", "--fp16-keep", "mask,foo", "-o", str(tmp_path / "v.onnx")],
         "--fp16-keep mask,foo: unknown group(s) foo"),
        (["build-engine", str(model), "--int8", "--calib-data", str(calib), "--quantize", "", "-o",
          str(tmp_path / "v.onnx")], "--quantize (empty): expected one or more of"),
        (["build-engine", str(tmp_path / "missing.onnx"), "-o", str(tmp_path / "v.onnx")],
         "missing.onnx: ONNX model not found"),
        (["export", "--backbone", "resnet50", "--img-size", "16", "-o", str(tmp_path / "v.onnx")],
         "--img-size 16: image height 16: too small for resnet50"),
    ]
    empty = tmp_path / "empty.onnx"
    empty.write_bytes(b"")
    cases.append((["info", str(empty)], "empty.onnx: an empty file, not an ONNX model"))
    plan = tmp_path / "other.plan"
    plan.write_bytes(b"a plan from another tool")
    (tmp_path / "other.plan.json").write_text("{}")
    cases.append((["info", str(plan)], "other.plan.json: holds no hsnet-deploy metadata"))
    for args, message in cases:
        code, _, err = run_cli(*args)
        assert code == 2 and message in " ".join(err.split()) and "Traceback" not in err, (args, err)
    assert not (tmp_path / "v.onnx").exists()


def test_info_reads_a_checkpoint_as_a_run_would(tmp_path):
    """Junk named .pt is an Error (it was shown as a checkpoint, with exit 0); ours shows its recorded backbone, the
    authors' the one its keys point to."""
    import torch

    from hsnet_deploy.model import save_checkpoint, seeded_model

    model = seeded_model("resnet50")
    save_checkpoint(model, tmp_path / "own.pt")
    torch.save({"state_dict": {f"module.{k}": v for k, v in model.state_dict().items()}}, tmp_path / "authors.pt")
    (tmp_path / "junk.pt").write_text("junk")
    code, _, err = run_cli("info", str(tmp_path / "junk.pt"))
    assert code == 2 and "junk.pt: not a readable PyTorch checkpoint" in err
    expected_values = sum(v.numel() for v in model.state_dict().values())
    for name, backbone in (("own.pt", "resnet50"), ("authors.pt", "not recorded (keys look like resnet50)")):
        code, out, err = run_cli("info", str(tmp_path / name), "--json", str(tmp_path / f"{name}.json"))
        assert code == 0, err
        assert backbone in out
        facts = json.loads((tmp_path / f"{name}.json").read_text())["checkpoint"]
        assert facts["tensors"] == len(model.state_dict()) and facts["parameters"] == expected_values
    assert facts["checkpoint_format"] == "authors" and facts["backbone_from_keys"] == "resnet50"


def test_a_bad_option_value_is_one_error_line_like_every_refusal():
    cases = [(["bench", "--iters", "x"],
              "Error: Invalid value for '--iters' / '-n': 'x' is not a valid integer (see 'hsnet-deploy bench --help')"),
             (["frob"], "Error: No such command 'frob' (see 'hsnet-deploy --help')"),
             (["export"], "Error: Missing option '-o' / '--output' (see 'hsnet-deploy export --help')")]
    for args, message in cases:
        code, _, err = run_cli(*args)
        assert code == 2 and [line for line in err.splitlines() if line.strip()] == [message], err
    code, out, err = run_cli()  # no command: the help, as before
    assert code == 2 and "Commands:" in out + err


def test_third_audit_outputs_under_a_file_and_damaged_plan_metadata(exported, tmp_path):
    """An output path under an existing FILE was accepted, then failed as an internal error after the work; a plan's
    sidecar that is not UTF-8, has a field of the wrong type or no image size crashed whatever read it first."""
    model, _, _ = exported("resnet50")
    afile = tmp_path / "afile"
    afile.write_text("x")
    q, m = _pair(tmp_path, "q")
    queries = tmp_path / "queries"
    queries.mkdir()
    _pair(queries, "a")
    cases = [
        (["info", str(model), "--json", str(afile / "x.json")], "afile is a file, not a directory (--json)"),
        (["predict", str(model), "--query", q, "--support", q, m, "-o", str(afile / "x.png")],
         "afile is a file, not a directory"),
        (["predict", str(model), "--query", str(queries), "--support", q, m, "-o", str(afile / "sub")],
         "is a file, so no folder can be made under it"),
    ]
    plan = tmp_path / "b.plan"
    plan.write_bytes(b"plan")
    sidecars = [
        (b"\xff\xfe{", "not a text file (not UTF-8)"),
        (b'{"backbone": "resnet50", "img_size": 64, "gate": "yes"}', "field 'gate' is \"yes\", expected an object"),
        (b'{"backbone": "resnet50", "img_size": 64, "stages": [1]}', "field 'stages' is [1], expected an object"),
        (b'{"backbone": "resnet50", "img_size": "abc"}', "field 'img_size' is \"abc\", expected an integer"),
        (b'{"backbone": "resnet50", "img_size": true}', "field 'img_size' is true, expected an integer"),
        (b'{"backbone": "resnet50", "img_size": 0}', "field 'img_size' is 0, expected a size in pixels"),
        (b'{"backbone": "resnet50", "img_size": null}', "metadata has no 'img_size'"),
        (b'{"backbone": "resnet50"}', "metadata has no 'img_size'"),
    ]
    for raw, message in sidecars:
        for command in (["info", str(plan)], ["predict", str(plan), "--query", q, "--support", q, m, "-o",
                                              str(tmp_path / "o.png")]):
            (tmp_path / "b.plan.json").write_bytes(raw)
            code, _, err = run_cli(*command)
            assert code == 2 and message in " ".join(err.split()) and "Traceback" not in err, (raw, err)
    for args, message in cases:
        code, _, err = run_cli(*args)
        assert code == 2 and message in " ".join(err.split()) and "Traceback" not in err, (args, err)
    assert not (tmp_path / "o.png").exists()


def test_third_audit_threads_apply_to_an_eager_checkpoint(tmp_path, monkeypatch):
    """`predict --threads 1` on a PyTorch checkpoint ran on every core: eager PyTorch's threads are the process's."""
    import torch

    from hsnet_deploy.model import save_checkpoint, seeded_model
    from hsnet_deploy.runtime.artifact import open_artifact

    save_checkpoint(seeded_model("resnet50"), tmp_path / "own.pt")
    set_to = []
    monkeypatch.setattr(torch, "set_num_threads", lambda n: set_to.append(n))
    open_artifact(tmp_path / "own.pt", "cpu", threads=1)
    open_artifact(tmp_path / "own.pt", "cpu")
    assert set_to == [1]


def test_third_audit_build_engine_and_eval_refusals(exported, tmp_path, monkeypatch):
    """build-engine: --device with a variant was silently dropped, a seed outside NumPy's range and a gate threshold
    outside [0, 1] were internal errors or a 'failed gate' after the work. eval: resuming with other settings
    advised 'once the file is fixed' and repeated the refused command."""
    from synthetic_datasets import make_fss

    import hsnet_deploy.cli as cli_module

    model, _, _ = exported("resnet50")
    out = str(tmp_path / "v.onnx")
    cases = [
        (["build-engine", str(model), "--fp16", "--device", "cuda", "-o", out], "--device: picks the device an FP32"),
        (["build-engine", str(model), "--fp16", "--seed", "-1", "-o", out], "--seed': -1 is not in the range"),
        (["build-engine", str(model), "--fp16", "--seed", str(2**32), "-o", out], "is not in the range 0<=x<=4294967295"),
        (["build-engine", str(model), "--fp16", "--gate-min-agreement", "2", "-o", out], "2.0 is not in the range"),
        (["build-engine", str(model), "--fp16", "--gate-max-logit-error", "-0.1", "-o", out], "not in the range x>=0"),
    ]
    for args, message in cases:
        code, _, err = run_cli(*args)
        assert code == 2 and message in " ".join(err.split()) and "Traceback" not in err, (args, err)
    assert not Path(out).exists()

    root = make_fss(tmp_path / "data")
    real_open = cli_module._open_runner

    def stops_on_the_third_call(*args, **kwargs):
        runner, calls = real_open(*args, **kwargs), []
        infer = runner.infer

        def counted(feed):
            calls.append(1)
            if len(calls) == 3:
                raise KeyboardInterrupt
            return infer(feed)

        runner.infer = counted
        return runner

    monkeypatch.setattr(cli_module, "_open_runner", stops_on_the_third_call)
    args = ["eval", str(model), "--dataset", "fss", "--data-root", str(root), "--episodes", "6"]
    code, _, err = run_cli(*args)
    assert code == 130, err
    monkeypatch.setattr(cli_module, "_open_runner", real_open)
    code, _, err = run_cli(*args, "--batch", "2", "--resume")
    text = " ".join(err.split())
    assert code == 2 and "saved by a run with other settings (batch differ: batch 1 saved, 2 now)" in text, err
    assert "once the file is fixed" not in text and "--batch 2 --resume" not in text
    code, _, err = run_cli(*args, "--resume")
    assert code == 0, err


def test_fourth_audit_export_bench_info_triton(exported, tmp_path, monkeypatch):
    """`export --opset 0` exported at 20; an own-format checkpoint without its state_dict or backbone was an internal
    error; `bench CHECKPOINT ONNX` refused what `bench ONNX CHECKPOINT` ran; `--img-size 2240` ran out of memory after
    minutes; triton-repo copied the model before finding its config path taken by a folder."""
    import torch

    from hsnet_deploy.info import environment
    from hsnet_deploy.model import save_checkpoint, seeded_model

    model, _, _ = exported("resnet50")
    out = tmp_path / "x.onnx"
    torch.save({"format": "hsnet-deploy/checkpoint-v1", "backbone": "resnet50"}, tmp_path / "nosd.pt")
    torch.save({"format": "hsnet-deploy/checkpoint-v1", "state_dict": {"w": torch.zeros(1)}}, tmp_path / "nobb.pt")
    cases = [
        (["export", "--backbone", "resnet50", "--img-size", "64", "--opset", "0", "-o", str(out)],
         "--opset 0: the exporter needs opset 18 or newer"),
        (["export", "--backbone", "resnet50", "--img-size", "2240", "-o", str(out)], "--img-size 2240: exports go"),
        (["info", str(tmp_path / "nosd.pt")], "nosd.pt: an hsnet-deploy checkpoint without a usable state_dict"),
        (["export", "--checkpoint", str(tmp_path / "nobb.pt"), "-o", str(out)], "without a usable backbone"),
    ]
    for args, message in cases:
        code, _, err = run_cli(*args)
        assert code == 2 and message in " ".join(err.split()) and "Traceback" not in err, (args, err)
    assert not out.exists()

    save_checkpoint(seeded_model("resnet50"), tmp_path / "own.pt")
    code, _, err = run_cli("bench", str(tmp_path / "own.pt"), str(model), "--iters", "1", "--warmup", "0",
                           "--no-stages", "--device", "cpu", "--json", str(tmp_path / "b.json"))
    assert code == 0, err
    record = json.loads((tmp_path / "b.json").read_text())
    assert record["img_size"] == 64 and len(record["results"]) >= 2  # the ONNX model's size, checkpoint first

    repo = tmp_path / "repo"
    (repo / "hsnet" / "config.pbtxt").mkdir(parents=True)
    code, _, err = run_cli("triton-repo", str(model), "-o", str(repo))
    assert code == 2 and "config.pbtxt: is a folder" in err and not (repo / "hsnet" / "1").exists()

    monkeypatch.setattr(os, "sched_getaffinity", lambda _pid: {0}, raising=False)
    assert environment()["devices"][0]["cores"] == 1  # the cores this process may use (a cpuset), not the host's


# fifth audit (2026-11-28): the README checked against the code -----------------------------------------------


def test_fifth_audit_refusals_come_first_and_say_the_true_reason(exported, tmp_path):
    """`--opset 99` was refused only after the checkpoint was read (a junk checkpoint was named instead) and after the
    seeded-weights banner; `bench m.onnx --cuda-graph` on a machine without ONNX Runtime's CUDA EP said "no ONNX
    artifact"; a small image over a small pixel limit was "0 megapixels"; the gate's note said "agreement with FP32
    decides" when the mIoU check had been asked for and failed the gate."""
    from hsnet_deploy.calibration.gate import unjudged_miou_note
    from hsnet_deploy.runtime.ort_runner import available_providers

    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    out = tmp_path / "x.onnx"
    code, _, err = run_cli("export", "--checkpoint", str(tmp_path / "junk.pt"), "--backbone", "resnet50",
                           "--opset", "99", "-o", str(out))
    assert code == 2 and "--opset 99: this torch" in err and "junk.pt" not in err, err
    code, stdout, err = run_cli("export", "--backbone", "resnet50", "--img-size", "64", "--opset", "99", "-o", str(out))
    assert code == 2 and "--opset 99" in err and "seeded" not in (stdout + err).lower(), err
    assert not out.exists()

    if "CUDAExecutionProvider" not in available_providers():
        model, _, _ = exported("resnet50")
        code, _, err = run_cli("bench", str(model), "--cuda-graph", "--iters", "1")
        message = " ".join(err.split())
        assert code == 2 and "CUDAExecutionProvider" in message and "no ONNX artifact" not in message, err

    image = tmp_path / "small.png"
    Image.new("RGB", (200, 200)).save(image)
    previous = preprocess.max_pixels()
    preprocess.set_max_pixels(20_000)
    try:
        with pytest.raises(UserError, match=r"200x200 \(0\.04 megapixels\), over the limit of 0\.02 megapixels"):
            preprocess.load_image(image)
    finally:
        preprocess.set_max_pixels(previous)

    asked = _report(0.99, 0.0, 0.0, GateThresholds.defaults(True, max_miou_drop=0.5))
    assert not asked.passed and "so the gate fails" in unjudged_miou_note(asked)
    default = _report(0.99, 0.0, 0.0, GateThresholds.defaults(True))
    assert default.passed and "agreement with FP32 decides" in unjudged_miou_note(default)


def test_fifth_audit_mutants_ignored_gate_options_and_one_path_for_two_outputs(exported, tmp_path):
    """Two refusals no test held (a mutation run removed each and every test passed): gate options on an FP32 build,
    and one path given for two outputs (the JSON report would replace the model)."""
    model, _, _ = exported("resnet50")
    out = tmp_path / "x.onnx"
    code, _, err = run_cli("build-engine", str(model), "--gate-min-agreement", "0.9", "-o", str(out))
    assert code == 2 and "--gate-min-agreement: for --fp16 or --int8" in " ".join(err.split()), err
    code, _, err = run_cli("build-engine", str(model), "-o", str(out), "--json", str(out))
    assert code == 2 and "given as both -o and --json; each output needs its own path" in " ".join(err.split()), err
    assert not out.exists()


def test_table_numbers_and_record_values():
    """Table cells keep 3-4 significant digits with no exponent (100 and above: whole numbers); a record's missing
    value shows as '-'."""
    import io

    from rich.console import Console

    from hsnet_deploy.console import kv_table, number

    assert [number(v) for v in (1695.4, 100.0, 99.94, 53.91, 1.234, 0.4521, 0.0)] == [
        "1695", "100", "99.9", "53.9", "1.23", "0.452", "0"]
    console = Console(width=80, file=io.StringIO())
    console.print(kv_table("facts", [("precision", "fp16"), ("gpu", None)]))
    lines = console.file.getvalue().splitlines()
    assert any("gpu" in line and " - " in line for line in lines) and "None" not in console.file.getvalue()


def test_a_reader_that_leaves_before_a_flush_sends_the_rest_to_devnull(tmp_path, monkeypatch):
    """`| head` closing the pipe surfaces on a flush as often as on a write: the flush drops the output too."""
    import os
    import sys

    from hsnet_deploy.console import ReaderMayLeave

    sink = tmp_path / "stdout"
    fd = os.open(sink, os.O_WRONLY | os.O_CREAT)

    class GonePipe:
        def write(self, text):
            raise BrokenPipeError

        def flush(self):
            raise BrokenPipeError

        def fileno(self):
            return fd

    monkeypatch.setattr(sys, "stdout", GonePipe())
    try:
        stream = ReaderMayLeave()
        stream.flush()  # no BrokenPipeError
        assert stream.write("table\n") == 6
        os.write(fd, b"after")  # fd 1's stand-in now points at /dev/null
    finally:
        os.close(fd)
    assert sink.read_bytes() == b""
