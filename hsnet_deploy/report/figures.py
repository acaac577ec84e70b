"""The report's figures: one function per question a reader asks, each writing one PNG.

matplotlib is an optional extra, imported here only, with the Agg backend (no display needed).
Sizes and fonts are chosen to stay readable in a screenshot of the page: titles, axis labels with units,
and runner names on the y axis so long names are never cut.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

STAGES = ("backbone", "correlation", "learner", "decoder", "other")
STAGE_COLOURS = ("#4c72b0", "#dd8452", "#55a868", "#c44e52", "#8c8c8c")
DPI = 110


def _pyplot():
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def _height(rows: int) -> float:
    return 1.6 + 0.45 * max(rows, 1)


def _save(fig, path: Path) -> None:
    fig.tight_layout()
    fig.savefig(path, dpi=DPI)
    _pyplot().close(fig)


def latency_distribution(labels: list[str], times_ms: list[list[float]], path: Path) -> None:
    """Every timed call per runner: a box (quartiles, whiskers at 1.5 IQR) with each call drawn as a dot."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(9, _height(len(labels))))
    positions = np.arange(len(labels))
    ax.boxplot(times_ms, positions=positions, orientation="horizontal", widths=0.5, showfliers=False)
    rng = np.random.default_rng(0)
    for y, times in zip(positions, times_ms):
        ax.scatter(times, y + rng.uniform(-0.15, 0.15, len(times)), s=10, alpha=0.6, color="#4c72b0", zorder=3)
    ax.set_yticks(positions, labels)
    ax.invert_yaxis()
    ax.set_xlabel("latency per call (ms)")
    counts = sorted({len(t) for t in times_ms})
    calls = f"{counts[0]} calls" if len(counts) == 1 else f"{counts[0]}-{counts[-1]} calls"
    ax.set_title(f"Latency of every timed call ({calls} per runner; box: quartiles, orange: median)")
    ax.grid(axis="x", alpha=0.3)
    _save(fig, path)


def stage_bars(labels: list[str], stages_ms: list[dict[str, float]], path: Path) -> None:
    """Per-stage time per runner as stacked horizontal bars."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(9, _height(len(labels)) + 0.4))
    left = np.zeros(len(labels))
    for stage, colour in zip(STAGES, STAGE_COLOURS):
        values = np.array([s.get(stage, 0.0) or 0.0 for s in stages_ms])
        if values.any():
            ax.barh(labels, values, left=left, color=colour, label=stage)
            left += values
    ax.invert_yaxis()
    ax.set_xlabel("time per call (ms)")
    ax.set_title("Where the time goes, per stage")
    ax.legend(loc="lower center", bbox_to_anchor=(0.5, 1.08), ncol=len(STAGES), frameon=False)
    ax.grid(axis="x", alpha=0.3)
    _save(fig, path)


def speedup_bars(labels: list[str], speedups: list[float], path: Path) -> None:
    """Speed-up over PyTorch eager FP32 measured in the same run; 1x marked."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(9, _height(len(labels))))
    bars = ax.barh(labels, speedups, color="#55a868")
    ax.bar_label(bars, labels=[f"{s:.2f}x" for s in speedups], padding=3)
    ax.axvline(1.0, color="black", linewidth=1, linestyle="--")
    ax.invert_yaxis()
    ax.set_xlabel("speed-up over PyTorch eager FP32 (x, same run)")
    ax.set_title("Speed-up over eager")
    ax.set_xlim(0, max([*speedups, 1.0]) * 1.2)
    _save(fig, path)


def gflops_bars(labels: list[str], gflops: list[float], matmul: float | None, path: Path) -> None:
    """Achieved GFLOP/s of the episode per runner beside this machine's FP32 matmul rate."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(9, _height(len(labels) + (1 if matmul else 0))))
    names, values, colours = list(labels), list(gflops), ["#4c72b0"] * len(labels)
    if matmul:
        names.append("FP32 matmul (this machine)")
        values.append(matmul)
        colours.append("#8c8c8c")
    bars = ax.barh(names, values, color=colours)
    ax.bar_label(bars, labels=[f"{v:.0f}" + (f"  ({100 * v / matmul:.0f}% of matmul)" if matmul and i < len(labels)
                                             else "") for i, v in enumerate(values)], padding=3)
    ax.invert_yaxis()
    ax.set_xlabel("GFLOP/s (episode FLOPs / mean latency)")
    ax.set_title("Achieved compute rate of one episode vs this machine's FP32 matmul")
    ax.set_xlim(0, max(values) * 1.45)
    _save(fig, path)


def class_iou_bars(names: list[str], ious: list[float], miou: float, paper: float | None, path: Path) -> None:
    """Per-class IoU sorted, with the mean and (authors' weights) the paper's mIoU as lines."""
    plt = _pyplot()
    order = np.argsort(ious)[::-1]
    names = [names[i] for i in order]
    ious = [ious[i] for i in order]
    fig, ax = plt.subplots(figsize=(max(6.0, 0.28 * len(names) + 2), 4.5))
    ax.bar(range(len(ious)), ious, color="#4c72b0")
    ax.axhline(miou, color="#c44e52", linewidth=1.5, label=f"mIoU {miou:.1f}")
    if paper is not None:
        ax.axhline(paper, color="black", linestyle="--", linewidth=1.2, label=f"paper mIoU {paper:.1f}")
    if len(names) <= 60:
        ax.set_xticks(range(len(names)), names, rotation=70, ha="right", fontsize=8)
        ax.set_xlabel("class (best to worst)")
    else:
        ax.set_xticks([])
        ax.set_xlabel(f"{len(names)} classes, best to worst")
    ax.set_ylabel("IoU (%)")
    ax.set_ylim(0, 100)
    ax.set_title(f"Per-class IoU ({len(names)} classes, sorted)")
    ax.legend(loc="upper right")
    _save(fig, path)


def fb_iou_bars(fb_iou: float, miou: float, path: Path) -> None:
    """mIoU (classes averaged) beside FB-IoU (foreground and background IoU averaged)."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(5, 2.6))
    bars = ax.barh(["mIoU", "FB-IoU"], [miou, fb_iou], color=["#4c72b0", "#55a868"])
    ax.bar_label(bars, labels=[f"{miou:.1f}", f"{fb_iou:.1f}"], padding=3)
    ax.set_xlim(0, 100)
    ax.invert_yaxis()
    ax.set_xlabel("score (%)")
    ax.set_title("mIoU and FB-IoU")
    _save(fig, path)


def episode_grid(rows: list[dict], title: str, path: Path) -> None:
    """One row per episode: query, first support with its mask, prediction, ground truth (uint8 RGB/gray)."""
    plt = _pyplot()
    cols = ("query", "support + mask", "prediction", "ground truth")
    fig, axes = plt.subplots(len(rows), 4, figsize=(8, 2.1 * len(rows) + 0.4), squeeze=False)
    for r, row in enumerate(rows):
        images = (row["query"], _overlay(row["support"], row["support_mask"]), row["pred"], row["gt"])
        for c, image in enumerate(images):
            ax = axes[r][c]
            ax.imshow(image, cmap="gray" if image.ndim == 2 else None, vmin=0, vmax=255)
            ax.set_xticks([])
            ax.set_yticks([])
            if r == 0:
                ax.set_title(cols[c], fontsize=10)
        axes[r][0].set_ylabel(f"#{row['index']} {row['class_name']}\nIoU {row['iou']:.0f}%", fontsize=9)
    fig.suptitle(title)
    _save(fig, path)


def _overlay(image: np.ndarray, mask: np.ndarray) -> np.ndarray:
    out = image.astype(np.float32).copy()
    fg = mask > 127
    out[fg] = 0.5 * out[fg] + 0.5 * np.array([255.0, 40.0, 40.0])
    return out.astype(np.uint8)
