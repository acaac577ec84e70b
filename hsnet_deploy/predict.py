"""Segment a person's own images: supports read and preprocessed once, each query run through any runner,
the mask written at the query's original size, plus an overlay a person can look at."""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from hsnet_deploy.artifacts import atomic_path
from hsnet_deploy.data.preprocess import (
    check_image_header,
    fit_mask_to_image,
    image_to_tensor,
    load_binary_mask,
    load_image,
    mask_to_tensor,
    original_size,
)
from hsnet_deploy.errors import UserError
from hsnet_deploy.model import mask_at_size
from hsnet_deploy.outputs import check_output_folder, check_outputs, same_path, unique_names
from hsnet_deploy.runtime.base import Runner

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff")
OVERLAY_COLOUR = np.array([255, 40, 40], dtype=np.float32)


@dataclass
class Supports:
    images: np.ndarray  # (K, 3, S, S) float32, preprocessed once
    masks: np.ndarray  # (K, S, S) float32 {0, 1}
    empty: list[str]  # mask files with no foreground (the caller warns)
    warnings: list[str] = field(default_factory=list)  # e.g. a mask that looks like a photo (the caller warns)
    notes: list[str] = field(default_factory=list)  # e.g. a photo turned by its EXIF orientation (the caller says)


def load_supports(pairs: list[tuple[str, str]], size: int) -> Supports:
    """Read and preprocess the K (image, mask) pairs once; a mask must have its image's size (as shown: photos
    are turned by their EXIF orientation, `fit_mask_to_image`)."""
    if not pairs:
        raise UserError("at least one --support IMAGE MASK pair is needed")
    images, masks, empty, warnings, notes = [], [], [], [], []
    for img_path, mask_path in pairs:
        img = load_image(img_path, orient=True, notes=notes)
        mask = load_binary_mask(mask_path, require_foreground=False, notes=warnings, orient=True)
        mask = fit_mask_to_image(mask, img, str(mask_path), str(img_path), notes)
        if not mask.any():
            empty.append(str(mask_path))
        images.append(image_to_tensor(img, size).numpy())
        masks.append(mask_to_tensor(mask, size).numpy())
    return Supports(np.stack(images), np.stack(masks), empty, warnings, notes)


def list_queries(query: str, supports: Sequence[tuple[str, str]] = ()) -> list[Path]:
    """The query image, or a folder's images (hidden files and the --support files themselves left out), each
    header checked now, so that a damaged file stops the command before any query runs, not half-way."""
    path = Path(query)
    if path.is_dir():
        support_files = [Path(p) for pair in supports for p in pair]
        found = sorted(p for p in path.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES and not p.name.startswith(".")
                       and p.is_file() and not any(same_path(p, s) for s in support_files))
        if not found:
            raise UserError(f"{path}: no images ({', '.join(IMAGE_SUFFIXES)}) in this directory")
    elif not path.is_file():
        raise UserError(f"{path}: query image not found")
    else:
        found = [path]
    for image in found:
        check_image_header(image)
    return found


def mask_at_original_size(logits: np.ndarray, height: int, width: int) -> np.ndarray:
    """(K, 2, S, S) logits -> (height, width) uint8 {0, 1}: bilinear (align_corners) upsampling of the
    logits before the argmax, then the authors' K-shot vote (as their --use_original_imgsize)."""
    return mask_at_size(logits, height, width).to(torch.uint8).numpy()


def overlay(img: Image.Image, mask: np.ndarray, alpha: float = 0.5) -> Image.Image:
    """The query with its foreground tinted red and outlined, so a person can judge the mask at a glance."""
    rgb = np.asarray(img.convert("RGB"), dtype=np.float32)
    fg = mask.astype(bool)
    rgb[fg] = (1 - alpha) * rgb[fg] + alpha * OVERLAY_COLOUR
    edge = fg ^ np.pad(fg, 1, mode="edge")[1:-1, 2:] | fg ^ np.pad(fg, 1, mode="edge")[2:, 1:-1]
    rgb[edge] = OVERLAY_COLOUR
    return Image.fromarray(rgb.clip(0, 255).astype(np.uint8))


def save_image(img: Image.Image, path: Path) -> None:
    with atomic_path(path) as tmp:
        img.save(tmp, format="JPEG" if path.suffix.lower() in (".jpg", ".jpeg") else "PNG", quality=92)


def predict(
    runner: Runner,
    queries: list[Path],
    supports: Supports,
    size: int,
    mask_out: Callable[[Path], Path],
    overlay_out: Callable[[Path], Path] | None = None,
    tick: Callable[[], None] = lambda: None,
    written: list[dict] | None = None,
) -> list[dict]:
    """Run each query against the same supports; write its mask PNG (0/255) and optionally its overlay.

    A query photo is turned by its EXIF orientation first (its record's `notes` say so): the mask then lies on
    the photo as viewers show it. Each query's record is appended to `written` as soon as its files are
    written, so a caller stopped half-way still holds the finished ones."""
    feed_supports = {"support_imgs": supports.images[None], "support_masks": supports.masks[None]}
    written = [] if written is None else written
    for query in queries:
        notes: list[str] = []
        img = load_image(query, orient=True, notes=notes)
        feed = {"query_img": image_to_tensor(img, size).numpy()[None], **feed_supports}
        logits = runner.infer(feed)["logits"][0]
        mask = mask_at_original_size(logits.astype(np.float32), img.height, img.width)
        size_on_disk = original_size(img)
        mask_img = Image.fromarray(mask * 255)
        if size_on_disk != img.size:  # decoded reduced (over the pixel limit): the mask still fits the file
            mask_img = mask_img.resize(size_on_disk, Image.NEAREST)
        out = mask_out(query)
        save_image(mask_img, out)
        record = {"query": str(query), "mask": str(out), "foreground_fraction": float(mask.mean()),
                  "size": list(size_on_disk), "width": size_on_disk[0], "height": size_on_disk[1],
                  "seconds": runner.inference_times[-1]}
        if size_on_disk != img.size:
            record["decoded_size"] = [img.width, img.height]
        if notes:
            record["notes"] = notes
        if overlay_out is not None:
            record["overlay"] = str(overlay_out(query))
            save_image(overlay(img, mask), overlay_out(query))
        written.append(record)
        tick()
    return written


MASK_SUFFIX = ".png"
OVERLAY_SUFFIXES = (".png", ".jpg", ".jpeg")


def output_paths(
    output: str,
    overlay_path: str | None,
    queries: list[Path],
    is_dir_query: bool,
    inputs: Sequence[tuple[str, str | os.PathLike | None]] = (),
    extra_outputs: Sequence[tuple[str, str | os.PathLike | None]] = (),
):
    """For one query: the given files. For a folder: OUTPUT and --overlay are folders, one file per query,
    each query mapped to its own name (`a.jpg` and `a.png` both in the folder: `a.jpg.png`, `a.png.png`).

    Checked before any work: masks are PNG (a JPEG would blur the 0/255 mask into many grey values), no
    output replaces an input or another output, every folder is writable. Creates the output folders.
    """
    if not is_dir_query:
        if Path(output).suffix.lower() != MASK_SUFFIX:
            raise UserError(f"{output}: -o: the mask is written as PNG (lossless 0/255; a JPEG would blur it into "
                            "many grey values); give a .png path")
        if overlay_path and Path(overlay_path).suffix.lower() not in OVERLAY_SUFFIXES:
            raise UserError(f"{overlay_path}: --overlay: expected a .png or .jpg path")
        check_outputs([("-o", output), ("--overlay", overlay_path), *extra_outputs],
                      [*inputs, *(("--query", q) for q in queries)])
        return (lambda q: Path(output)), ((lambda q: Path(overlay_path)) if overlay_path else None)
    query_dir = [("--query", queries[0].parent)] if queries else []
    for label, folder in (("-o", output), ("--overlay", overlay_path)):
        if folder and Path(folder).suffix.lower() in IMAGE_SUFFIXES and not Path(folder).is_dir():
            raise UserError(f"{folder}: {label} names an image file, but --query is a folder: {label} is then the "
                            "folder its files go to; give a folder path")
        if folder:
            check_output_folder(folder, label, [*query_dir, *inputs])
    mask_names = unique_names(queries, MASK_SUFFIX)
    over_names = unique_names(queries, ".jpg")
    planned = [("-o", Path(output) / mask_names[q]) for q in queries]
    if overlay_path:
        planned += [("--overlay", Path(overlay_path) / over_names[q]) for q in queries]
    check_outputs(extra_outputs, inputs)
    check_outputs([*planned, *extra_outputs], [*inputs, *(("--query", q) for q in queries)], check_folders=False)
    for folder in filter(None, (output, overlay_path)):
        os.makedirs(folder, exist_ok=True)
    mask_fn = lambda q: Path(output) / mask_names[q]
    over_fn = (lambda q: Path(overlay_path) / over_names[q]) if overlay_path else None
    return mask_fn, over_fn
