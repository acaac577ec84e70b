import builtins
import json
import re
from html.parser import HTMLParser

import numpy as np
import pytest
from conftest import run_cli
from PIL import Image
from synthetic_datasets import make_fss

from hsnet_deploy.report import ExtremeEpisodes, write_bench_report, write_eval_report

pytest.importorskip("matplotlib", reason="the report tests need the plot extra (matplotlib)")


class _Links(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.links: list[str] = []
        self.text: list[str] = []

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        for key in ("src", "href"):
            if attrs.get(key):
                self.links.append(attrs[key])

    def handle_data(self, data):
        self.text.append(data)


def _check_folder(folder):
    """index.html links only files that exist, each PNG decodes; returns (page text, linked files)."""
    parser = _Links()
    parser.feed((folder / "index.html").read_text())
    assert parser.links
    for link in parser.links:
        assert not re.match(r"^[a-z]+://", link), f"remote resource {link}"
        assert (folder / link).is_file(), f"{link} is linked but missing"
        if link.endswith(".png"):
            with Image.open(folder / link) as img:
                img.load()
                assert img.width > 200 and img.height > 100
    return " ".join(parser.text), parser.links


def test_bench_report_shows_every_runner_and_stage(exported, tmp_path):
    path, _, _ = exported("resnet50")
    out = tmp_path / "report"
    code, _, err = run_cli("bench", str(path), "--iters", "3", "--warmup", "1", "--report", str(out),
                           "--json", str(tmp_path / "b.json"))
    assert code == 0, err
    text, links = _check_folder(out)
    assert {"latency.png", "stages.png", "speedup.png", "gflops.png", "bench.json"} <= set(links)
    data = json.loads((out / "bench.json").read_text())
    assert data == json.loads((tmp_path / "b.json").read_text())
    import torch

    for fact in ("date", "machine", "versions", "settings", f"torch {torch.__version__}", "iters 3", "warmup 1",
                 data["machine"]["cpu"]):
        assert fact in text, fact
    for result in data["results"]:
        assert len(result["times_ms"]) == result["iters"] == 3  # every timed call, not only percentiles
        assert result["label"] in text
        for stage in result["stages_ms"]:
            assert stage in text


def test_eval_report_has_class_iou_and_episode_grids(exported, tmp_path):
    path, _, _ = exported("resnet50")
    root = make_fss(tmp_path / "data")
    out = tmp_path / "eval-report"
    code, _, err = run_cli("eval", str(path), "--dataset", "fss", "--data-root", str(root), "--shots", "1",
                           "--episodes", "6", "--report", str(out))
    assert code == 0, err
    text, links = _check_folder(out)
    assert {"class_iou.png", "fb_iou.png", "episodes_worst.png", "episodes_best.png", "eval.json"} <= set(links)
    result = json.loads((out / "eval.json").read_text())
    assert result["class_iou"]
    for cid in result["class_iou"]:
        assert f"{cid} {result['class_names'][cid]}" in text  # every class of the JSON is on the page
    assert f"{result['miou']:.3g}" in text and f"{result['fb_iou']:.3g}" in text
    assert "machine" in text and result["machine"]["cpu"] in text  # the README promises the machine
    assert result["settings"]["episodes"] == 6 and result["command"][:2] == ["hsnet-deploy", "eval"]


def test_eval_report_draws_the_paper_figure_for_authors_weights(tmp_path, monkeypatch):
    from hsnet_deploy.report import figures

    drawn = []
    real = figures.class_iou_bars
    monkeypatch.setattr(figures, "class_iou_bars", lambda *a: (drawn.append(a[3]), real(*a)))
    result = {"dataset": "fss", "fold": 0, "shots": 5, "episodes": 2, "miou": 80.0, "fb_iou": 85.0,
              "class_iou": {"0": 70.0, "1": 90.0}, "class_names": {"0": "cat", "1": "dog"}, "seconds": 1.0,
              "runner": "r", "artifact": "a.onnx", "paper_miou": [85.5, 87.8]}
    out = write_eval_report(result, None, tmp_path / "rep")
    text, _ = _check_folder(out)
    assert drawn == [87.8]  # the paper's line in the figure
    assert "87.8" in text  # the 5-shot figure, not the 1-shot one
    assert "85.5" not in text
    assert "0 cat" in text and "1 dog" in text


def test_extreme_episodes_keep_the_lowest_and_highest_iou():
    keep = ExtremeEpisodes(keep=2)
    rng = np.random.default_rng(0)
    ious = [10, 90, 50, 5, 95, 60]
    for i, iou in enumerate(ious):
        img = rng.standard_normal((3, 32, 32)).astype(np.float32)
        mask = np.zeros((32, 32), np.float32)
        keep.offer(i, f"c{i}", img, img, mask, mask, mask, inter_fg=iou, union_fg=100)
    keep.offer(99, "empty", img, img, mask, mask, mask, inter_fg=0, union_fg=0)  # no IoU: skipped
    assert [r["iou"] for r in keep.worst()] == [5, 10]
    assert [r["iou"] for r in keep.best()] == [95, 90]
    assert keep.best()[0]["query"].shape == (128, 128, 3) and keep.best()[0]["gt"].dtype == np.uint8


def test_report_refuses_without_matplotlib_before_any_work(exported, tmp_path, monkeypatch):
    path, _, _ = exported("resnet50")
    real_import = builtins.__import__

    def no_matplotlib(name, *args, **kwargs):
        if name == "matplotlib" or name.startswith("matplotlib."):
            raise ImportError("No module named 'matplotlib'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_matplotlib)
    code, _, err = run_cli("bench", str(path), "--iters", "2", "--report", str(tmp_path / "r"))
    assert code == 2 and err.startswith("Error:") and "matplotlib" in err and 'pip install -e ".[plot]"' in err
    assert "Traceback" not in err and not (tmp_path / "r").exists()
    opened = []
    monkeypatch.setattr("hsnet_deploy.cli._open_runner", lambda *a, **k: opened.append(a))
    code, _, err = run_cli("eval", str(path), "--dataset", "fss", "--data-root", str(tmp_path),
                           "--report", str(tmp_path / "r"))
    assert code == 2 and "matplotlib" in err and not opened  # refused before the model is even opened


def test_report_never_overwrites_a_folder_that_is_not_a_report(tmp_path):
    target = tmp_path / "mine"
    target.mkdir()
    (target / "notes.txt").write_text("keep me")
    code, _, err = run_cli("bench", "--iters", "1", "--report", str(target))
    assert code == 2 and "not empty" in err
    assert (target / "notes.txt").read_text() == "keep me"


SMALL_SUITE = {"backbone": "resnet50", "img_size": 64, "batch": 1, "shots": 1, "machine": {"cpu": "x"},
               "results": [{"label": "r", "artifact": "m.onnx", "times_ms": [1.0, 2.0], "iters": 2,
                            "latency_ms": {"mean": 1.5, "p50": 1.5, "p99": 2.0}, "stages_ms": {},
                            "episodes_per_s": 1}]}


def test_report_never_empties_a_folder_that_only_has_an_index_html(tmp_path):
    """A user's site with its own index.html is not an earlier report: refused, nothing deleted."""
    site = tmp_path / "site"
    (site / "photos").mkdir(parents=True)
    (site / "index.html").write_text("<html><title>my site</title></html>")
    (site / "notes.txt").write_text("precious")
    code, _, err = run_cli("bench", "--iters", "1", "--report", str(site))
    assert code == 2 and "holds no earlier report" in err
    assert (site / "notes.txt").read_text() == "precious" and (site / "photos").is_dir()


def test_report_refuses_an_earlier_report_that_gained_other_files(tmp_path):
    out = write_bench_report(SMALL_SUITE, tmp_path / "rep")
    (out / "notes.txt").write_text("mine")
    (out / "extra").mkdir()
    code, _, err = run_cli("bench", "--iters", "1", "--report", str(out))
    assert code == 2 and "extra/, notes.txt" in err and "would delete" in err
    assert (out / "notes.txt").read_text() == "mine"
    (out / "notes.txt").unlink()
    (out / "extra").rmdir()
    write_bench_report(SMALL_SUITE, out)  # an earlier report alone is replaced
    assert (out / "bench.json").is_file()


def test_every_file_a_report_writes_is_known_as_a_report_file(tmp_path):
    """The refusal above must not catch a report's own files: each one it writes is in REPORT_FILES."""
    from hsnet_deploy.report.page import REPORT_FILES

    extremes = ExtremeEpisodes(keep=1)
    img, mask = np.zeros((3, 32, 32), np.float32), np.zeros((32, 32), np.float32)
    extremes.offer(0, "c", img, img, mask, mask, mask, inter_fg=1, union_fg=2)
    result = {"dataset": "fss", "fold": 0, "shots": 1, "episodes": 1, "miou": 50.0, "fb_iou": 60.0,
              "class_iou": {"0": 50.0}, "class_names": {"0": "cat"}, "seconds": 1.0}
    suite = {**SMALL_SUITE, "results": [{**SMALL_SUITE["results"][0], "stages_ms": {"backbone": 1.0},
                                         "speedup_vs_eager": 1.2, "gflop_per_s": 3.0}],
             "matmul_gflop_per_s": 10.0}
    written = {p.name for p in write_bench_report(suite, tmp_path / "b").iterdir()}
    written |= {p.name for p in write_eval_report(result, extremes, tmp_path / "e").iterdir()}
    assert {"latency.png", "stages.png", "speedup.png", "gflops.png", "episodes_best.png"} <= written
    assert written <= REPORT_FILES


@pytest.mark.parametrize("command", ["bench", "eval"])
def test_json_inside_the_report_folder_is_refused_before_any_work(exported, tmp_path, monkeypatch, command):
    """The report replaces its folder as a whole: a --json written into it would be deleted after 'Wrote'."""
    path, _, _ = exported("resnet50")
    opened = []
    monkeypatch.setattr("hsnet_deploy.cli._open_runner", lambda *a, **k: opened.append(a))
    monkeypatch.setattr("hsnet_deploy.runtime.suite.run_suite", lambda *a, **k: opened.append(a))
    rep = write_bench_report(SMALL_SUITE, tmp_path / "rep")  # an earlier report: the folder exists
    args = ["--dataset", "fss", "--data-root", str(tmp_path)] if command == "eval" else ["--iters", "1"]
    code, _, err = run_cli(command, str(path), *args, "--report", str(rep), "--json", str(rep / "mine.json"))
    assert code == 2 and "--json" in err and "inside the --report folder" in err and not opened
    if command == "eval":
        code, _, err = run_cli(command, str(path), *args, "--report", str(rep), "--state", str(rep / "s.json"))
        assert code == 2 and "--state" in err and "inside the --report folder" in err and not opened


def test_interrupted_report_leaves_the_previous_one(tmp_path, monkeypatch):
    suite = {"backbone": "resnet50", "img_size": 64, "batch": 1, "shots": 1, "machine": {"cpu": "x"},
             "results": [{"label": "r", "artifact": "m.onnx", "times_ms": [1.0, 2.0], "iters": 2,
                          "latency_ms": {"mean": 1.5, "p50": 1.5, "p99": 2.0}, "stages_ms": {}, "episodes_per_s": 1}]}
    out = tmp_path / "rep"
    write_bench_report(suite, out)
    before = (out / "index.html").read_text()

    from hsnet_deploy.report import figures

    def boom(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(figures, "latency_distribution", boom)
    with pytest.raises(KeyboardInterrupt):
        write_bench_report(suite, out)
    assert (out / "index.html").read_text() == before
    assert [p.name for p in tmp_path.iterdir()] == ["rep"]  # no temporary folder left behind


def test_extreme_episodes_draw_ignored_pixels_grey():
    keep = ExtremeEpisodes(keep=1)
    img = np.zeros((3, 32, 32), np.float32)
    gt = np.zeros((32, 32), np.float32)
    gt[8:16, 8:16] = 1
    ignore = np.zeros((32, 32), bool)
    ignore[:, :2] = True  # PASCAL's border
    keep.offer(0, "c", img, img, gt, gt, gt, inter_fg=64, union_fg=64, ignore=ignore)
    thumb = keep.best()[0]["gt"]
    assert set(np.unique(thumb)) == {0, 128, 255}
    assert (thumb[:, :4] == 128).all() and thumb[40:60, 40:60].min() == 255


def test_a_replaced_report_leaves_no_old_folder_and_others_can_read_it(tmp_path):
    """Replacing an earlier report renames the old one aside and deletes it: only the report folder remains. The
    folder is made with mkdtemp (0700); it gets the user's umask like any folder, so others can open the page."""
    import os

    old = os.umask(0o022)
    try:
        out = write_bench_report(SMALL_SUITE, tmp_path / "rep")
        write_bench_report(SMALL_SUITE, out)
    finally:
        os.umask(old)
    assert [p.name for p in tmp_path.iterdir()] == ["rep"]
    assert out.stat().st_mode & 0o777 == 0o755
    assert (out / "index.html").stat().st_mode & 0o777 == 0o644


def test_report_tables_escape_names_and_give_episodes_per_second(tmp_path):
    suite = {**SMALL_SUITE, "results": [{**SMALL_SUITE["results"][0], "label": "<b>fast</b> & co"}]}
    page = (write_bench_report(suite, tmp_path / "b") / "index.html").read_text()
    assert "<td>&lt;b&gt;fast&lt;/b&gt; &amp; co</td>" in page and "<b>fast" not in page
    result = {"dataset": "fss", "fold": 0, "shots": 1, "episodes": 6, "miou": 50.0, "fb_iou": 60.0,
              "class_iou": {"0": 50.0}, "class_names": {"0": "<cat>"}, "seconds": 3.0}
    page = (write_eval_report(result, None, tmp_path / "e") / "index.html").read_text()
    # mIoU %, FB-IoU %, paper mIoU % (none for a run without the authors' figures), episodes, 6 / 3 s
    assert "<tr><td>50</td><td>60</td><td>-</td><td>6</td><td>2</td></tr>" in page
    assert "<td>0 &lt;cat&gt;</td>" in page
