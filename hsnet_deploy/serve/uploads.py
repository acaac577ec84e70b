"""Uploaded files -> preprocessed arrays, each request checked on its own before it reaches a batch.

The same functions as `predict` (load_image, load_binary_mask, image_to_tensor, mask_to_tensor) read the
uploads, so the service's masks equal `predict`'s for the same files. Every refusal is a RequestError
carrying its HTTP status, raised before the request joins a batch: a bad request never disturbs others.
"""

from __future__ import annotations

import io
from dataclasses import dataclass

import numpy as np
from PIL import Image

from hsnet_deploy.data.preprocess import (
    MaskSizeMismatch,
    fit_mask_to_image,
    image_to_tensor,
    load_binary_mask,
    load_image,
    mask_to_tensor,
    set_max_pixels,
)
from hsnet_deploy.errors import UserError
from hsnet_deploy.serve.store import SupportSet


class RequestError(Exception):
    """A client's mistake: `status` (4xx) and a message naming the field and what is wrong."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status, self.message = status, message


@dataclass(frozen=True)
class Limits:
    max_upload_bytes: int  # whole request body (413 above it)
    max_pixels: int  # width * height of any one uploaded image or mask (413 above it)
    max_shots: int  # K of a support set (400 above it)


class NamedUpload(io.BytesIO):
    """Bytes that print as the form field they came from, so the readers' messages name it."""

    def __init__(self, data: bytes, label: str):
        super().__init__(data)
        self.label = label

    def __str__(self) -> str:
        return self.label


def _checked(data: bytes, label: str, limits: Limits) -> NamedUpload:
    """Read only the header first: a pixel bomb is refused before it is decoded."""
    if not data:
        raise RequestError(400, f"{label}: empty file")
    try:
        with Image.open(io.BytesIO(data)) as head:
            width, height = head.size
    except Image.DecompressionBombError:
        raise RequestError(413, f"{label}: image over Pillow's decompression-bomb limit") from None
    except Exception:  # noqa: BLE001 - whatever Pillow raises on bytes that are no image
        raise RequestError(400, f"{label}: cannot read the image (not a PNG, JPEG or other format Pillow reads)") \
            from None
    if width * height > limits.max_pixels:
        raise RequestError(413, f"{label}: {width}x{height} = {width * height} pixels, over the server's limit "
                                f"of {limits.max_pixels}")
    # The readers' own decode limit is per process (the CLI's --max-megapixels, 40 MP by default); for an upload
    # it is the server's --max-pixels, checked above, so an image within it is never refused (or reduced) again.
    set_max_pixels(limits.max_pixels)
    return NamedUpload(data, label)


def _read(reader, upload: NamedUpload, **kwargs):
    try:
        return reader(upload, **kwargs)
    except UserError as exc:
        raise RequestError(400, str(exc)) from None
    except Image.DecompressionBombError:
        raise RequestError(413, f"{upload}: image over Pillow's decompression-bomb limit") from None


def support_set(images: list[bytes], masks: list[bytes], size: int, limits: Limits) -> tuple[SupportSet, list[int]]:
    """K (image, mask) uploads -> the preprocessed set and the indices of masks with no foreground."""
    if not images:
        raise RequestError(400, "no `image` fields: send K images and K masks as repeated `image` and `mask` fields")
    if len(images) != len(masks):
        raise RequestError(400, f"{len(images)} `image` fields but {len(masks)} `mask` fields; send one mask per image")
    if len(images) > limits.max_shots:
        raise RequestError(400, f"K = {len(images)} support images, above this server's limit of {limits.max_shots} "
                                "(serve --max-shots; a TensorRT plan's profile may lower it)")
    tensors, mask_tensors, empty = [], [], []
    for i, (img_bytes, mask_bytes) in enumerate(zip(images, masks, strict=True)):
        img = _read(load_image, _checked(img_bytes, f"image {i + 1}", limits), orient=True)
        mask = _read(load_binary_mask, _checked(mask_bytes, f"mask {i + 1}", limits), require_foreground=False,
                     orient=True)
        try:
            mask = fit_mask_to_image(mask, img, f"mask {i + 1}", f"image {i + 1}")
        except MaskSizeMismatch as exc:
            (mw, mh), (iw, ih) = exc.mask_size, exc.image_size
            shown = " as shown (EXIF orientation)" if exc.turned else ""
            raise RequestError(400, f"mask {i + 1} is {mw}x{mh} but image {i + 1} is {iw}x{ih}{shown}; a mask must "
                                    "have its image's size") from None
        if not mask.any():
            empty.append(i + 1)
        tensors.append(image_to_tensor(img, size).numpy())
        mask_tensors.append(mask_to_tensor(mask, size).numpy())
    return SupportSet(np.stack(tensors), np.stack(mask_tensors)), empty


def query(data: bytes, size: int, limits: Limits) -> tuple[np.ndarray, int, int]:
    """The query upload -> ((3, S, S) float32, height, width), turned by its EXIF orientation as `predict` does:
    the mask comes back at the size and orientation viewers show the photo in."""
    img = _read(load_image, _checked(data, "image", limits), orient=True)
    return image_to_tensor(img, size).numpy(), img.height, img.width


def mask_png(mask: np.ndarray) -> bytes:
    """(H, W) {0, 1} -> a 0/255 greyscale PNG, as `predict` writes it."""
    buf = io.BytesIO()
    Image.fromarray((mask * 255).astype(np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


def rle(mask: np.ndarray) -> dict:
    """COCO's uncompressed RLE: run lengths over the column-major (Fortran-order) pixels, background first,
    so `pycocotools.mask.frPyObjects(rle, h, w)` and any COCO tool decode it."""
    flat = np.asarray(mask, dtype=np.uint8).ravel(order="F")
    changes = np.flatnonzero(np.diff(flat)) + 1
    bounds = np.concatenate([[0], changes, [flat.size]])
    counts = np.diff(bounds).tolist()
    if flat.size and flat[0] == 1:
        counts = [0, *counts]
    return {"size": [int(mask.shape[0]), int(mask.shape[1])], "counts": counts}


def rle_decode(encoded: dict) -> np.ndarray:
    """The inverse of `rle` (for clients and tests)."""
    height, width = encoded["size"]
    values = np.arange(len(encoded["counts"])) % 2
    flat = np.repeat(values.astype(np.uint8), encoded["counts"])
    return flat.reshape((height, width), order="F")


def mask_json(mask: np.ndarray) -> dict:
    return {"height": int(mask.shape[0]), "width": int(mask.shape[1]),
            "foreground_fraction": float(mask.mean()) if mask.size else 0.0, "rle": rle(mask)}
