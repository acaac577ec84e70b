import json
from pathlib import Path

import numpy as np
import onnx
import pytest
from conftest import EXPORT_SIZE, run_cli
from PIL import Image
from synthetic_datasets import make_fss


def test_version_and_help():
    code, out, _ = run_cli("--version")
    assert code == 0 and "hsnet-deploy, version" in out
    for command in ("export", "build-engine", "bench", "eval", "predict"):
        code, out, _ = run_cli(command, "--help")
        assert code == 0 and "Usage:" in out


@pytest.mark.parametrize("args,message", [
    (["--backbone", "resnet18", "-o", "x.onnx"], "Invalid value for '--backbone'"),
    (["--backbone", "vgg16", "--img-size", "520", "-o", "x.onnx"], "image height 520: vgg16 cannot take it"),
    (["--backbone", "resnet50", "--checkpoint", "missing.pt", "-o", "x.onnx"], "missing.pt: checkpoint file not found"),
    (["--backbone", "resnet50", "--opset", "13", "--img-size", "64", "-o", "x.onnx"], "--opset 13"),
])
def test_export_bad_input_exits_2_and_writes_nothing(tmp_path, monkeypatch, args, message):
    monkeypatch.chdir(tmp_path)
    code, _, err = run_cli("export", *args)
    assert code == 2 and message in err and "Traceback" not in err
    assert not list(tmp_path.iterdir())


def test_export_refuses_a_directory_or_unwritable_output(tmp_path):
    code, _, err = run_cli("export", "--backbone", "resnet50", "-o", str(tmp_path))
    assert code == 2 and "is a directory" in err
    code, _, err = run_cli("export", "--backbone", "resnet50", "-o", str(tmp_path / "no" / "x.onnx"))
    assert code == 2 and "does not exist" in err


def test_export_rejects_a_file_that_is_no_checkpoint(tmp_path):
    bad = tmp_path / "best_model.pt"
    bad.write_text("hello")
    code, _, err = run_cli("export", "--backbone", "resnet50", "--checkpoint", str(bad), "-o", str(tmp_path / "m.onnx"))
    assert code == 2 and "best_model.pt: not a readable PyTorch checkpoint" in err
    assert not (tmp_path / "m.onnx").exists()


def test_a_checkpoint_holding_python_objects_is_refused_without_unsafe_advice(tmp_path):
    import collections

    import torch

    bad = tmp_path / "best_model.pt"
    torch.save({"state_dict": collections.OrderedDict(), "args": argparse_namespace()}, bad)
    code, _, err = run_cli("export", "--backbone", "resnet50", "--checkpoint", str(bad), "-o", str(tmp_path / "m.onnx"))
    text = " ".join(err.split())
    assert code == 2 and "best_model.pt: holds Python objects beyond tensors" in text and "Namespace" in text
    assert "weights_only" not in text and "save the model's state_dict instead" in text
    assert not (tmp_path / "m.onnx").exists()
    junk = tmp_path / "photo.pt"
    junk.write_bytes(bytes([0xFF, 0xD8, 0xFF, 0xE0]) * 8)  # a JPEG's first bytes
    code, _, err = run_cli("export", "--backbone", "resnet50", "--checkpoint", str(junk), "-o", str(tmp_path / "m.onnx"))
    text = " ".join(err.split())
    assert code == 2 and "photo.pt: not a readable PyTorch checkpoint (" in text and "weights_only" not in text
    cut = tmp_path / "cut.pt"
    cut.write_bytes(bad.read_bytes()[:100])  # a zip checkpoint cut short: torch's first sentence says what broke
    code, _, err = run_cli("export", "--backbone", "resnet50", "--checkpoint", str(cut), "-o", str(tmp_path / "m.onnx"))
    text = " ".join(err.split())
    assert code == 2 and "cut.pt: not a readable PyTorch checkpoint (PytorchStreamReader failed reading zip" in text
    assert text.rstrip().endswith(")")  # one sentence, not a cut-off paragraph


def argparse_namespace():
    import argparse

    return argparse.Namespace(lr=0.001)


def test_interrupted_export_write_leaves_no_file(tmp_path, monkeypatch):
    from hsnet_deploy.export import onnx_export
    from hsnet_deploy.model import seeded_model

    real_save = onnx.save

    def save_then_interrupt(proto, path, *a, **k):
        real_save(proto, path, *a, **k)
        if str(path).endswith(".tmp"):
            raise KeyboardInterrupt

    monkeypatch.setattr(onnx_export.onnx, "save", save_then_interrupt)
    target = tmp_path / "m.onnx"
    with pytest.raises(KeyboardInterrupt):
        onnx_export.export_onnx(seeded_model("resnet50"), target, EXPORT_SIZE)
    assert list(tmp_path.iterdir()) == []


def test_export_command_writes_a_verified_model(tmp_path):
    target = tmp_path / "m.onnx"
    report = tmp_path / "report.json"
    code, out, err = run_cli("export", "--backbone", "resnet50", "--img-size", str(EXPORT_SIZE), "-o", str(target),
                             "--json", str(report), "--layout", "none")
    assert code == 0, err
    assert "SEEDED RANDOM" in err and "Wrote" in out and "corr_c2" in out
    data = json.loads(report.read_text())
    assert data["passed"] and data["op_counts"]["Conv"] == 53 + 30 + 4
    assert target.stat().st_size == data["file_bytes"]
    # the run record bench and eval JSON carry, and where the weights came from
    assert data["weights"] == {"weights": "seeded-random", "seed": 0} and data["settings"]["layout"] == "none"
    assert data["command"][:2] == ["hsnet-deploy", "export"] and data["versions"]["torch"] and data["timestamp"]
    # --layout none: recorded in the metadata, and conv1 runs as the authors' plain conv (no dilation)
    from hsnet_deploy.artifacts import props_to_meta

    proto = onnx.load(str(target))
    assert props_to_meta({p.key: p.value for p in proto.metadata_props})["layout"] == "none"
    dilations = [a.ints for n in proto.graph.node if n.op_type == "Conv" for a in n.attribute if a.name == "dilations"]
    assert all(set(d) == {1} for d in dilations)


def test_default_export_records_its_layout_and_runs_conv1_dilated(exported):
    from hsnet_deploy.artifacts import props_to_meta

    path, _, _ = exported("resnet50")
    proto = onnx.load(str(path))
    assert props_to_meta({p.key: p.value for p in proto.metadata_props})["layout"] == "all"
    dilated = [n for n in proto.graph.node if n.op_type == "Conv"
               and any(a.name == "dilations" and set(a.ints) != {1} for a in n.attribute)]
    # conv1 dilated by the support grid's size wherever that grid is larger than 1 x 1 after pruning (at 64 px
    # one squeeze conv; the mixing blocks run support-major, where conv1 is a plain batched conv)
    assert dilated


def test_build_engine_onnxruntime(exported, tmp_path):
    path, _, _ = exported("resnet50")
    code, _out, err = run_cli("build-engine", str(path), "--backend", "onnxruntime", "-o", str(tmp_path / "o.onnx"))
    assert code == 0, err
    assert (tmp_path / "o.onnx").exists()
    code, _, err = run_cli("build-engine", str(path), "--int8", "-o", str(tmp_path / "q.onnx"))
    assert code == 2 and "--int8 needs --calib-data" in err


def test_build_engine_tensorrt_says_what_to_install(exported, tmp_path):
    pytest.importorskip("pytest")
    try:
        import tensorrt  # noqa: F401
        pytest.skip("reason: TensorRT is installed here; the missing-package message cannot be shown")
    except ImportError:
        pass
    path, _, _ = exported("resnet50")
    code, _, err = run_cli("build-engine", str(path), "--backend", "tensorrt", "-o", str(tmp_path / "m.plan"))
    assert code == 2 and "pip install" in err and not (tmp_path / "m.plan").exists()


def _write_pair(tmp_path, name, size=(48, 40), box=(10, 8, 30, 28), mask_size=None):
    rng = np.random.default_rng(len(name))
    img = Image.fromarray(rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8))
    mask = np.zeros((mask_size or size)[::-1], np.uint8)
    if box:
        mask[box[1]:box[3], box[0]:box[2]] = 255
    img.save(tmp_path / f"{name}.jpg")
    Image.fromarray(mask).save(tmp_path / f"{name}.png")
    return str(tmp_path / f"{name}.jpg"), str(tmp_path / f"{name}.png")


def test_predict_writes_mask_at_query_size_and_an_overlay(exported, tmp_path):
    path, _, _ = exported("resnet50")
    query, _ = _write_pair(tmp_path, "query", size=(70, 50))
    s1, m1 = _write_pair(tmp_path, "s1")
    s2, m2 = _write_pair(tmp_path, "s2", size=(60, 64), box=(5, 5, 40, 50))
    out, over = tmp_path / "mask.png", tmp_path / "overlay.jpg"
    code, _stdout, err = run_cli("predict", str(path), "--query", query, "--support", s1, m1, "--support", s2, m2,
                                "-o", str(out), "--overlay", str(over), "--json", str(tmp_path / "p.json"))
    assert code == 0, err
    mask = np.asarray(Image.open(out))
    assert mask.shape == (50, 70) and set(np.unique(mask)) <= {0, 255}
    assert Image.open(over).size == (70, 50)
    assert json.loads((tmp_path / "p.json").read_text())["shots"] == 2


def test_predict_folder_of_queries(exported, tmp_path):
    path, _, _ = exported("resnet50")
    qdir = tmp_path / "queries"
    qdir.mkdir()
    for i in range(3):
        _write_pair(qdir, f"q{i}", size=(40 + 8 * i, 40))
    for p in qdir.glob("*.png"):
        p.unlink()
    s, m = _write_pair(tmp_path, "s")
    code, _, err = run_cli("predict", str(path), "--query", str(qdir), "--support", s, m, "-o", str(tmp_path / "out"))
    assert code == 0, err
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["q0.png", "q1.png", "q2.png"]
    assert Image.open(tmp_path / "out" / "q2.png").size == (56, 40)


def test_predict_folder_checks_every_query_before_the_first_runs(exported, tmp_path):
    """A damaged file among the queries stops the command before any mask is written (it used to surface at its
    turn, after the masks of the files before it); hidden files and the --support files themselves are no
    queries."""
    path, _, _ = exported("resnet50")
    qdir = tmp_path / "queries"
    qdir.mkdir()
    _write_pair(qdir, "q0")
    _write_pair(qdir, "q1")
    (qdir / "q0.png").unlink()
    (qdir / "q1.png").unlink()
    (qdir / "q2.jpg").write_bytes(b"\xff\xd8 not a jpeg")
    s, m = _write_pair(qdir, "s")  # the supports live in the query folder too
    code, _, err = run_cli("predict", str(path), "--query", str(qdir), "--support", s, m, "-o", str(tmp_path / "out"))
    assert code == 2 and "q2.jpg: cannot read image" in err, err
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())
    (qdir / "q2.jpg").rename(qdir / ".q2.jpg")  # hidden: not a query
    code, _, err = run_cli("predict", str(path), "--query", str(qdir), "--support", s, m, "-o", str(tmp_path / "out"))
    assert code == 0, err
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["q0.png", "q1.png"]


def test_predict_folder_query_refuses_an_image_name_as_output_folder(exported, tmp_path):
    path, _, _ = exported("resnet50")
    qdir = tmp_path / "queries"
    qdir.mkdir()
    _write_pair(qdir, "q0")
    (qdir / "q0.png").unlink()
    s, m = _write_pair(tmp_path, "s")
    code, _, err = run_cli("predict", str(path), "--query", str(qdir), "--support", s, m, "-o", str(tmp_path / "m.png"))
    assert code == 2 and "m.png: -o names an image file, but --query is a folder" in err
    assert not (tmp_path / "m.png").exists()


def test_predict_stopped_half_way_lists_the_masks_written(exported, tmp_path, monkeypatch):
    """Ctrl-C after the first of two queries: exit 130, its mask kept and its record in --json (complete: false)."""
    import hsnet_deploy.predict as predict_lib

    path, _, _ = exported("resnet50")
    qdir = tmp_path / "queries"
    qdir.mkdir()
    for name in ("a", "b"):
        _write_pair(qdir, name)
        (qdir / f"{name}.png").unlink()
    s, m = _write_pair(tmp_path, "s")
    real_load = predict_lib.load_image

    def load_or_stop(image, **kwargs):
        if Path(image).name == "b.jpg":
            raise KeyboardInterrupt
        return real_load(image, **kwargs)

    monkeypatch.setattr(predict_lib, "load_image", load_or_stop)
    report = tmp_path / "p.json"
    code, out, err = run_cli("predict", str(path), "--query", str(qdir), "--support", s, m, "-o", str(tmp_path / "out"),
                             "--json", str(report))
    assert code == 130, err
    assert "Stopped after 1 of 2 queries" in err and "a.jpg" in out
    data = json.loads(report.read_text())
    assert data["complete"] is False and [Path(r["query"]).name for r in data["results"]] == ["a.jpg"]
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["a.png"]


def test_predict_turns_a_phone_photo_by_its_exif_orientation(exported, tmp_path):
    """A query stored 70x50 with EXIF orientation 6 is shown 50x70: its mask and overlay come out 50x70 (they lie on
    the photo as viewers show it), and the JSON says it was turned."""
    path, _, _ = exported("resnet50")
    exif = Image.Exif()
    exif[0x0112] = 6
    query = tmp_path / "phone.jpg"
    Image.fromarray(np.random.default_rng(5).integers(0, 255, (50, 70, 3), dtype=np.uint8)).save(
        query, exif=exif.tobytes())
    s, m = _write_pair(tmp_path, "s")
    out, over, report = tmp_path / "mask.png", tmp_path / "over.png", tmp_path / "p.json"
    code, _, err = run_cli("predict", str(path), "--query", str(query), "--support", s, m, "-o", str(out),
                           "--overlay", str(over), "--json", str(report))
    assert code == 0, err
    assert Image.open(out).size == (50, 70) and Image.open(over).size == (50, 70)
    record = json.loads(report.read_text())["results"][0]
    assert (record["width"], record["height"]) == (50, 70) and "EXIF orientation (6)" in record["notes"][0]


def test_predict_bad_inputs(exported, tmp_path):
    path, _, _ = exported("resnet50")
    query, _ = _write_pair(tmp_path, "query")
    s, _ = _write_pair(tmp_path, "s")
    _, wrong = _write_pair(tmp_path, "wrong", size=(48, 40), mask_size=(20, 20))
    code, _, err = run_cli("predict", str(path), "--query", query, "--support", s, wrong, "-o", str(tmp_path / "o.png"))
    assert code == 2 and "wrong.png: mask is 20x20 but its image" in err
    code, _, err = run_cli("predict", str(path), "--query", str(tmp_path / "nope.jpg"), "--support", s, wrong,
                           "-o", str(tmp_path / "o.png"))
    assert code == 2 and "nope.jpg: query image not found" in err
    _, empty = _write_pair(tmp_path, "empty", box=None)
    code, _, err = run_cli("predict", str(path), "--query", query, "--support", s, empty, "-o", str(tmp_path / "o.png"))
    assert code == 0 and "Warning" in err and "empty.png" in err
    code, _, err = run_cli("predict", str(tmp_path / "missing.onnx"), "--query", query, "--support", s, empty,
                           "-o", str(tmp_path / "o.png"))
    assert code == 2 and "missing.onnx: artifact not found" in err


def test_eval_on_a_synthetic_fss_root_and_resume(exported, tmp_path):
    path, _, _ = exported("resnet50")
    root = make_fss(tmp_path / "data")
    out1 = tmp_path / "full.json"
    code, stdout, err = run_cli("eval", str(path), "--dataset", "fss", "--data-root", str(root), "--shots", "2",
                                "--episodes", "6", "--json", str(out1))
    assert code == 0, err
    full = json.loads(out1.read_text())
    assert full["episodes"] == 6 and 0 <= full["miou"] <= 100 and "mIoU" in stdout
    assert not (tmp_path / "full.json.eval-state.json").exists()
    code, _, err = run_cli("eval", str(path), "--dataset", "pascal", "--data-root", str(root))
    assert code == 2 and "VOC2012" in err


def test_eval_keeps_an_interrupted_runs_state_unless_resumed(exported, tmp_path):
    """Without --resume the first save replaced an interrupted run's totals; now that run's state is refused with
    both ways on, and the file is left as it was."""
    path, _, _ = exported("resnet50")
    root = make_fss(tmp_path / "data")
    state = tmp_path / "state.json"
    text = json.dumps({"format": "hsnet-deploy-eval-state/1", "next_episode": 4, "complete": False,
                       "settings": {"episodes": 30, "dataset": "fss", "fold": 0, "shots": 1}})
    state.write_text(text)
    code, _, err = run_cli("eval", str(path), "--dataset", "fss", "--data-root", str(root), "--state", str(state))
    assert code == 2 and "holds an interrupted run (fss, 1-shot: 4 of 30 episodes counted)" in err and "--resume" in err
    assert state.read_text() == text


@pytest.mark.parametrize("args,message", [
    (["bench", "--threads", "-1"], "Invalid value for '--threads': -1 is not in the range x>=1"),
    (["bench", "--threads", "0"], "Invalid value for '--threads': 0 is not in the range x>=1"),
    (["eval", "m.onnx", "--dataset", "fss", "--data-root", ".", "--threads", "-1"], "'--threads': -1"),
    (["predict", "m.onnx", "--query", "q.jpg", "--support", "s.jpg", "s.png", "-o", "o.png", "--threads", "0"],
     "'--threads': 0"),
    # the embedded default's size is checked here, not by the export child it would start
    (["bench", "--img-size", "0"], "image height 0: too small for resnet50 (at least 32)"),
    # options that would be ignored or break the variant, refused before any work
    (["export", "--backbone", "resnet50", "--opset", "99", "-o", "x.onnx"], "--opset 99: this torch"),
    (["export", "--backbone", "resnet50", "--checkpoint", "c.pt", "--seed", "3", "-o", "x.onnx"],
     "with --checkpoint it would be ignored"),
    (["build-engine", "m.onnx", "--fp16", "--gate-episodes", "0", "-o", "x.onnx"], "'--gate-episodes': 0"),
    (["build-engine", "m.onnx", "--fp16", "--fold", "2", "-o", "x.onnx"], "(no --calib-data) it would be ignored"),
    (["build-engine", "m.onnx", "--fp16", "--fp16-keep", "l2norm", "-o", "x.onnx"], "`mask` is required"),
])
def test_bad_thread_counts_and_default_sizes_exit_2(tmp_path, monkeypatch, args, message):
    monkeypatch.chdir(tmp_path)
    code, _, err = run_cli(*args)
    assert code == 2 and message in err, err
    assert "Internal error" not in err and "Failed" not in err and not list(tmp_path.iterdir())


def test_overlay_tints_the_foreground_outlines_it_and_leaves_the_background():
    """A grey 8x8 query with a 4x4 square mask: the square's inner pixels are half grey, half the overlay colour;
    its rim (foreground pixels with a background neighbour to the right or below) is the overlay colour; pixels
    two away from the square are untouched."""
    from hsnet_deploy.predict import OVERLAY_COLOUR, overlay

    img = Image.new("RGB", (8, 8), (100, 100, 100))
    mask = np.zeros((8, 8), dtype=np.uint8)
    mask[2:6, 2:6] = 1
    out = np.asarray(overlay(img, mask, alpha=0.5)).astype(int)
    colour = OVERLAY_COLOUR.astype(int)
    tinted = ((100 + OVERLAY_COLOUR) / 2).astype(int)
    assert (out[3, 3] == tinted).all() and (out[4, 4] == tinted).all()
    assert (out[5, 3] == colour).all() and (out[3, 5] == colour).all()  # bottom and right rim
    assert (out[0, 0] == 100).all() and (out[7, 7] == 100).all() and (out[3, 0] == 100).all()


def test_predict_records_the_masks_fraction_and_writes_a_jpeg_overlay_for_jpeg_names(tmp_path):
    """predict() with a stand-in runner whose logits say foreground in the left half: the record's fraction is the
    written mask's share of 255 pixels (about one half), its size the query's, and an overlay named .jpeg is a
    JPEG (like .jpg), one named .png a PNG."""
    from hsnet_deploy.predict import Supports, predict

    size = 8

    class HalfRunner:
        inference_times = (0.01,)

        def infer(self, feed):
            fg = np.zeros((size, size), np.float32)
            fg[:, : size // 2] = 1
            logits = np.stack([1 - fg, fg])[None, None]  # (B=1, K=1, 2, S, S)
            return {"logits": (logits - 0.5) * 10}

    query = tmp_path / "q.jpg"
    Image.fromarray(np.full((50, 70, 3), 128, np.uint8)).save(query)
    supports = Supports(np.zeros((1, 3, size, size), np.float32), np.ones((1, size, size), np.float32), [])
    for suffix, fmt in ((".jpeg", "JPEG"), (".png", "PNG")):
        records = predict(HalfRunner(), [query], supports, size, lambda q: tmp_path / "m.png",
                          lambda q, s=suffix: tmp_path / f"over{s}")
        assert Image.open(tmp_path / f"over{suffix}").format == fmt
    written = np.asarray(Image.open(tmp_path / "m.png"))
    assert Image.open(tmp_path / "m.png").format == "PNG" and written.shape == (50, 70)
    record = records[0]
    assert record["foreground_fraction"] == pytest.approx((written == 255).mean())
    assert record["foreground_fraction"] == pytest.approx(0.5, abs=0.05)
    assert (record["width"], record["height"]) == (70, 50) and record["size"] == [70, 50]


def test_predict_output_paths_check_the_overlay_suffix_and_name_folder_overlays_jpg(tmp_path):
    from hsnet_deploy.errors import UserError
    from hsnet_deploy.predict import output_paths

    query = tmp_path / "q.png"
    Image.new("RGB", (8, 8)).save(query)
    with pytest.raises(UserError, match="--overlay: expected a .png or .jpg path"):
        output_paths(str(tmp_path / "m.png"), str(tmp_path / "o.gif"), [query], is_dir_query=False)
    qdir = tmp_path / "queries"
    qdir.mkdir()
    queries = [qdir / "a.png", qdir / "b.jpg"]
    mask_fn, over_fn = output_paths(str(tmp_path / "masks"), str(tmp_path / "overlays"), queries, is_dir_query=True)
    assert [mask_fn(q).name for q in queries] == ["a.png", "b.png"]
    assert [over_fn(q).name for q in queries] == ["a.jpg", "b.jpg"]  # overlays are photos: JPEG
