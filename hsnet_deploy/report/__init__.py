"""`bench --report DIR` and `eval --report DIR`: a page of figures a person can look at, beside the JSON.

Built from the same result dictionaries the commands write with --json, so the page and the JSON never
disagree. Needs matplotlib (the `plot` extra); `require_plotting` says so before any work starts.
"""

from __future__ import annotations

import datetime as dt
import os
from collections.abc import Sequence
from pathlib import Path

from hsnet_deploy.errors import UserError
from hsnet_deploy.report.episodes import ExtremeEpisodes
from hsnet_deploy.report.page import Page, check_report_dir, report_dir, write_json

PLOT_INSTALL = 'pip install -e ".[plot]"  (or: pip install matplotlib)'

__all__ = ["ExtremeEpisodes", "require_plotting", "write_bench_report", "write_eval_report"]


def require_plotting(path: str | os.PathLike, outputs: Sequence[tuple[str, str | None]] = ()) -> Path:
    """Check, before the work, that a report can be drawn and written at `path`, apart from the command's
    other `outputs` ((option, path) pairs)."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise UserError(f"--report needs matplotlib, which is not installed: {PLOT_INSTALL}") from None
    return check_report_dir(path, outputs)


def _stamp() -> str:
    return dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")


def versions() -> dict[str, str]:
    """The versions that decide the figures, read in this process (the run that measured them)."""
    import platform
    from importlib import metadata

    found = {"hsnet-deploy": __import__("hsnet_deploy").__version__, "python": platform.python_version()}
    for dist in ("torch", "onnxruntime", "onnxruntime-gpu", "onnx", "tensorrt", "numpy"):
        try:
            found[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            continue
    return found


def runner_names(results: list[dict]) -> list[str]:
    """A figure's name for each runner: its label over its artifact, so two artifacts on one backend differ."""
    return [f"{r['label']}\n{Path(r['artifact']).name}" if r.get("artifact") else r["label"] for r in results]


def _pairs(d: dict) -> str:
    return ", ".join(f"{k} {v}" for k, v in d.items() if v not in (None, "", [], {})) or "-"


def write_bench_report(suite: dict, path: str | os.PathLike, settings: dict | None = None) -> Path:
    """index.html with latency distribution, stage bars, speed-up and GFLOP/s for a `bench` result.

    `settings`: the command's options, shown on the page (the suite carries B, K and the image size)."""
    from hsnet_deploy.report import figures

    results = [r for r in suite.get("results", []) if r.get("times_ms")]
    page = Page(f"hsnet-deploy bench: {suite.get('backbone', '')} {suite.get('img_size')}x{suite.get('img_size')}, "
                f"B={suite.get('batch')} K={suite.get('shots')}")
    with report_dir(path) as folder:
        shown = {k: suite.get(k) for k in ("batch", "shots", "img_size", "backbone")}
        shown.update(suite.get("settings") or {})
        shown.update(settings or {})
        page.facts([("date", suite.get("timestamp") or _stamp()),
                    ("machine", _pairs(suite.get("machine", {}))),
                    ("versions", _pairs(suite.get("versions") or versions())),
                    ("settings", _pairs(shown)),
                    ("episode cost", f"{suite['episode_gflop']:.2f} GFLOP per episode (PyTorch FlopCounter)"
                     if suite.get("episode_gflop") else "-"),
                    ("matmul", f"{suite['matmul_gflop_per_s']:.0f} GFLOP/s FP32 on this machine, same run"
                     if suite.get("matmul_gflop_per_s") else "-"),
                    ("notes", "; ".join(suite.get("notes", []) + suite.get("skipped", [])) or "-")])
        if suite.get("interrupted"):
            page.text("Interrupted (Ctrl-C): the figures show what was measured before it.")
        page.table(["runner", "artifact", "calls", "mean ms", "p50 ms", "p99 ms", "cold ms", "episodes/s",
                    "vs eager"],
                   [[r["label"], Path(r.get("artifact") or "").name or "-", r.get("iters"),
                     r["latency_ms"].get("mean"), r["latency_ms"].get("p50"), r["latency_ms"].get("p99"),
                     r.get("cold_ms"), r.get("episodes_per_s"), r.get("speedup_vs_eager")]
                    for r in suite.get("results", []) if r.get("latency_ms")])
        labels = runner_names(results)
        if results:
            figures.latency_distribution(labels, [r["times_ms"] for r in results], folder / "latency.png")
            page.heading("Latency of every call")
            page.question("How fast is each runner, and how steady? Each dot is one timed call.")
            page.figure("latency.png", "latency distribution per runner")
        staged = [r for r in results if r.get("stages_ms")]
        if staged:
            figures.stage_bars(runner_names(staged), [r["stages_ms"] for r in staged], folder / "stages.png")
            page.heading("Time per stage")
            page.question("Which part of HSNet costs the most on each runner?")
            page.figure("stages.png", "per-stage time per runner")
            stage_names = sorted({s for r in staged for s in r["stages_ms"]})
            page.table(["runner", *stage_names], [[r["label"], *[r["stages_ms"].get(s) for s in stage_names]]
                                                  for r in staged])
        fast = [r for r in results if r.get("speedup_vs_eager")]
        if fast:
            figures.speedup_bars(runner_names(fast), [r["speedup_vs_eager"] for r in fast],
                                 folder / "speedup.png")
            page.heading("Speed-up over eager")
            page.question("How much faster than the PyTorch a user already has, measured in the same run?")
            page.figure("speedup.png", "speed-up over PyTorch eager per runner")
        rated = [r for r in results if r.get("gflop_per_s")]
        if rated:
            figures.gflops_bars(runner_names(rated), [r["gflop_per_s"] for r in rated],
                                suite.get("matmul_gflop_per_s"), folder / "gflops.png")
            page.heading("Achieved GFLOP/s")
            page.question("How close does each runner get to what this machine's matmul can do?")
            page.figure("gflops.png", "achieved GFLOP/s beside the machine's matmul")
        write_json(folder, "bench.json", suite)
        page.link("bench.json", "The run's JSON (every figure, every timed call)")
        page.write(folder)
    return Path(path)


def write_eval_report(result: dict, extremes: ExtremeEpisodes | None, path: str | os.PathLike) -> Path:
    """index.html with per-class IoU, mIoU / FB-IoU and a grid of the worst and best episodes."""
    from hsnet_deploy.report import figures

    ids = list(result.get("class_iou", {}))
    names = [f"{c} {result.get('class_names', {}).get(c, '')}".strip() for c in ids]
    ious = [float(result["class_iou"][c]) for c in ids]
    paper = _paper_figure(result)
    page = Page(f"hsnet-deploy eval: {result.get('dataset')} {result.get('shots')}-shot, "
                f"{result.get('episodes')} episodes")
    with report_dir(path) as folder:
        page.facts([("date", result.get("timestamp") or _stamp()), ("machine", _pairs(result.get("machine", {}))),
                    ("runner", result.get("runner", "-")),
                    ("artifact", result.get("artifact", "-")), ("versions", _pairs(result.get("versions") or versions())),
                    ("settings", _pairs({k: result.get(k) for k in ("dataset", "fold", "shots", "img_size",
                                                                     "original_size", "episodes")})),
                    ("notes", "; ".join(result.get("notes", [])) or "-")])
        page.table(["mIoU %", "FB-IoU %", "paper mIoU %", "episodes", "episodes/s"],
                   [[result.get("miou"), result.get("fb_iou"), paper, result.get("episodes"),
                     result["episodes"] / max(result.get("seconds") or 1e-9, 1e-9) if result.get("episodes") else None]])
        if ious:
            figures.class_iou_bars(names, ious, float(result["miou"]), paper, folder / "class_iou.png")
            page.heading("Per-class IoU")
            page.question("Which classes does the model get right, which does it miss, and how does the mean "
                          "compare with the paper?")
            page.figure("class_iou.png", "per-class IoU, sorted")
            page.table(["class", "IoU %"], sorted(([n, v] for n, v in zip(names, ious)), key=lambda row: -row[1]))
        figures.fb_iou_bars(float(result.get("fb_iou", 0.0)), float(result.get("miou", 0.0)), folder / "fb_iou.png")
        page.heading("mIoU and FB-IoU")
        page.question("How good are the masks overall, counting the background too?")
        page.figure("fb_iou.png", "mIoU beside FB-IoU")
        for which, rows in (("worst", extremes.worst() if extremes else []),
                            ("best", extremes.best() if extremes else [])):
            if rows:
                figures.episode_grid(rows, f"The {len(rows)} {which} episodes (foreground IoU)",
                                     folder / f"episodes_{which}.png")
                page.heading(f"{which.capitalize()} episodes")
                page.question(f"What do the {which} episodes look like: query, support with its mask, prediction, "
                              "ground truth?")
                page.figure(f"episodes_{which}.png", f"{which} episodes")
        if result.get("resumed_from"):
            page.text(f"Resumed run: the episode grids cover episodes {result['resumed_from']} onwards only.")
        write_json(folder, "eval.json", result)
        page.link("eval.json", "The run's JSON")
        page.write(folder)
    return Path(path)


def _paper_figure(result: dict) -> float | None:
    """The paper's mIoU for this run's shots (1 or 5), when the eval JSON carries the authors' figures."""
    figures_1_5 = result.get("paper_miou")
    if not figures_1_5 or result.get("shots") not in (1, 5):
        return None
    return float(figures_1_5[0 if result["shots"] == 1 else 1])
