"""Image and mask preprocessing, exactly as the authors' data pipeline does it.

The authors resize the uint8 PIL image with PIL's bilinear filter (torchvision `Resize` on a PIL image,
which antialiases) and only then convert to float; resizing a float tensor with `F.interpolate`
gives different pixels and different accuracy numbers. Masks go through PyTorch's legacy
`mode='nearest'` (source index floor(dst * in / out), in float32), which is neither PIL NEAREST
nor 'nearest-exact'.
"""

from __future__ import annotations

import contextlib
import functools
import os
import warnings
from collections.abc import Iterator

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageOps, UnidentifiedImageError

from hsnet_deploy.artifacts import IMAGENET_MEAN, IMAGENET_STD
from hsnet_deploy.data.limits import DEFAULT_MAX_MEGAPIXELS
from hsnet_deploy.errors import UserError

IMG_SIZE = 400  # authors' test.py: FSSDataset.initialize(img_size=400, ...)
IGNORE_LABEL = 255  # authors' common/evaluation.py: PASCAL boundary pixels


_limits = {"max_pixels": int(DEFAULT_MAX_MEGAPIXELS * 1e6)}
DRAFT_SCALES = (2, 4, 8)  # what a JPEG decoder can reduce by while decoding (DCT scaling)


def set_max_pixels(max_pixels: int | None) -> None:
    """The decode limit for every image and mask this process reads (None: no limit of ours)."""
    _limits["max_pixels"] = int(max_pixels) if max_pixels else None


def max_pixels() -> int | None:
    return _limits["max_pixels"]


def _check_pixels(img: Image.Image, path: str | os.PathLike, what: str, reducible: bool) -> None:
    """Refuse an image over the pixel limit before decoding it, naming the file; a JPEG photo (not a mask)
    is instead decoded at 1/2, 1/4 or 1/8 scale, enough for a model that looks at a few hundred pixels."""
    limit = _limits["max_pixels"]
    w, h = img.size
    img.info["original_size"] = (w, h)
    if not limit or w * h <= limit:
        return
    if reducible and img.format == "JPEG":
        for d in DRAFT_SCALES:
            if -(-w // d) * -(-h // d) <= limit:
                img.draft(img.mode, (w // d, h // d))
                img.info["original_size"] = (w, h)
                return
    raise UserError(f"{path}: {what} is {w}x{h} ({w * h / 1e6:.3g} megapixels), over the limit of "
                    f"{limit / 1e6:g} megapixels; raise it with --max-megapixels or shrink the file")


def _open(path: str | os.PathLike, what: str, reducible: bool = False) -> Image.Image:
    with _reading(path, what):
        img = Image.open(path)
        _check_pixels(img, path, what, reducible)
        img.load()  # decode now, so a truncated file fails here with its name, not later
    return img


def check_image_header(path: str | os.PathLike, what: str = "image") -> None:
    """Read only the header: the file exists, is a format Pillow reads and is within the pixel limit. A folder
    of queries is checked so before the first one runs (a body damaged past its header still fails at its turn)."""
    with _reading(path, what), Image.open(path) as img:
        _check_pixels(img, path, what, reducible=what == "image")


@contextlib.contextmanager
def _reading(path: str | os.PathLike, what: str) -> Iterator[None]:
    """Pillow's and the file system's errors while reading `path` as one-line UserErrors naming it."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # our own limit decides
            yield
    except UserError:
        raise
    except FileNotFoundError:
        raise UserError(f"{path}: {what} file not found") from None
    except IsADirectoryError:
        raise UserError(f"{path}: is a directory, expected an {what} file") from None
    except Image.DecompressionBombError:  # beyond twice Pillow's own limit: refused before even our check
        limit = _limits["max_pixels"]
        ours = f", over the limit of {limit / 1e6:g} megapixels" if limit else ""
        raise UserError(f"{path}: {what} is over {2 * (Image.MAX_IMAGE_PIXELS or 0) / 1e6:.0f} megapixels{ours}, "
                        "too large to decode safely; shrink the file") from None
    except (UnidentifiedImageError, OSError, ValueError) as exc:
        raise UserError(f"{path}: cannot read {what} ({exc})") from None


def original_size(img: Image.Image) -> tuple[int, int]:
    """(width, height) of the file, before any reduction on decode."""
    return tuple(img.info.get("original_size", img.size))


def load_image(path: str | os.PathLike, *, orient: bool = False, notes: list[str] | None = None) -> Image.Image:
    """Open an image as RGB (grey, palette and RGBA images are converted, as the authors' `.convert('RGB')`).

    Over the pixel limit (`set_max_pixels`) a JPEG is decoded reduced, any other format is refused;
    `original_size(img)` gives the file's own size either way (as shown, when `orient` turned it).
    Images of more than 8 bits a channel are scaled to 8 bits (`_to_8bit`): `.convert('RGB')` would clip a
    16-bit photo to white. `orient` (a person's own photos: predict, serve): the image is turned as its EXIF
    orientation says (`orient_image`), so a phone photo's mask comes out as viewers show the photo; the
    dataset readers leave it off, as the authors' loader does.
    """
    img = _open(path, "image", reducible=True)
    if orient:
        img = orient_image(img, path, notes)
    return _to_8bit(img, path).convert("RGB")


DEEP_MODES = ("I", "I;16", "I;16B", "I;16L", "I;16N", "F")  # Pillow's modes of more than 8 bits a channel
SIXTEEN_BIT = 257.0  # 65535 / 255: a 16-bit value to 8 bits, as image viewers scale it


def _to_8bit(img: Image.Image, path: str | os.PathLike) -> Image.Image:
    """A greyscale image of 16 or 32 bits as 8-bit 'L'. 16-bit modes are scaled by their full range; the
    32-bit integer and float modes carry no range, so theirs is read off the values: up to 1.0 (float) is
    0..1, up to 255 is already 8-bit, up to 65535 is 16-bit; anything else (negative, larger, NaN) is refused."""
    if img.mode not in DEEP_MODES:
        return img
    values = np.asarray(img)
    if img.mode.startswith("I;16"):
        divisor = SIXTEEN_BIT
    else:
        low, high = (float(values.min()), float(values.max())) if values.size else (0.0, 0.0)
        if not (np.isfinite(low) and np.isfinite(high)) or low < 0 or high > 65535:
            raise UserError(f"{path}: image values range {low:g}..{high:g} (mode {img.mode}); expected 0..1, "
                            "0..255 or 0..65535")
        divisor = 1 / 255 if img.mode == "F" and high <= 1.0 else 1.0 if high <= 255 else SIXTEEN_BIT
    scaled = np.clip(np.rint(values.astype(np.float64) / divisor), 0, 255).astype(np.uint8)
    out = Image.fromarray(scaled, mode="L")
    out.info.update(img.info)
    return out


EXIF_ORIENTATION = 0x0112
# EXIF orientation -> the transpose that shows the stored pixels upright (the EXIF 2.3 table, as Pillow's
# ImageOps.exif_transpose applies it); 5 to 8 swap width and height.
ORIENTATION_TRANSPOSE = {
    2: Image.Transpose.FLIP_LEFT_RIGHT, 3: Image.Transpose.ROTATE_180, 4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE, 6: Image.Transpose.ROTATE_270, 7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_90,
}


def orientation(img: Image.Image) -> int:
    """The EXIF orientation an image was turned by (`orient_image`), or the one its file carries; 1 = none."""
    if "exif_orientation" in img.info:
        return int(img.info["exif_orientation"])
    try:
        value = img.getexif().get(EXIF_ORIENTATION, 1)
    except Exception:  # noqa: BLE001 - a damaged EXIF block: the pixels are still an image
        return 1
    return value if value in ORIENTATION_TRANSPOSE else 1


def orient_image(img: Image.Image, path: str | os.PathLike, notes: list[str] | None = None) -> Image.Image:
    """`img` turned as its EXIF orientation says (ImageOps.exif_transpose), with `original_size` turned too and
    the orientation kept in `info['exif_orientation']`; a note names the file when it was turned."""
    turn = orientation(img)
    if turn == 1:
        return img
    turned = ImageOps.exif_transpose(img)
    turned.info["original_size"] = turned_size(original_size(img), turn)
    turned.info["exif_orientation"] = turn
    if notes is not None:
        notes.append(f"{path}: turned as its EXIF orientation ({turn}) says: read as viewers show it, "
                     f"{turned.width}x{turned.height}")
    return turned


def turned_size(size: tuple[int, int], turn: int) -> tuple[int, int]:
    """(width, height) after the EXIF orientation `turn`: orientations 5 to 8 swap them."""
    return (size[1], size[0]) if turn >= 5 else size


def header_size(path: str | os.PathLike, what: str = "image") -> tuple[tuple[int, int], int]:
    """The stored (width, height) and the EXIF orientation (1: none) of a file, from its header alone."""
    with _reading(path, what), Image.open(path) as img:
        return img.size, orientation(img)


def fit_mask_to_image(mask: np.ndarray, image: Image.Image, mask_name: str, image_name: str,
                      notes: list[str] | None = None) -> np.ndarray:
    """A support mask in its image's orientation as read, or an error naming both files.

    The mask must have the image's size as shown. A mask of the size of the image's stored pixels (the image
    turned by its EXIF orientation, `orient_image`, to a different shape) was drawn on those pixels: it is
    turned the same way. (A square image cannot tell; its mask is taken as drawn on the photo as shown.)
    """
    width, height = original_size(image)
    if mask.shape == (height, width):
        return mask
    turn = orientation(image)
    if turn >= 5 and mask.shape == (width, height):
        if notes is not None:
            notes.append(f"{mask_name}: has the stored size of {image_name} (before its EXIF turn): turned with it")
        turned = Image.fromarray(mask.astype(np.uint8)).transpose(ORIENTATION_TRANSPOSE[turn])
        return np.asarray(turned).astype(mask.dtype)
    raise MaskSizeMismatch(mask_name, image_name, (mask.shape[1], mask.shape[0]), (width, height), turn != 1)


class MaskSizeMismatch(UserError):
    """A mask whose size is not its image's; the sizes are (width, height), the image's as shown."""

    def __init__(self, mask_name: str, image_name: str, mask_size: tuple[int, int], image_size: tuple[int, int],
                 turned: bool):
        self.mask_size, self.image_size, self.turned = mask_size, image_size, turned
        super().__init__(f"{mask_name}: mask is {mask_size[0]}x{mask_size[1]} but its image {image_name} is "
                         f"{image_size[0]}x{image_size[1]}" + (" as shown (EXIF orientation)" if turned else ""))


def image_to_tensor(img: Image.Image, size: int = IMG_SIZE) -> torch.Tensor:
    """(3, size, size) float32: PIL bilinear resize of the uint8 image, /255, ImageNet normalisation.

    The arithmetic is torchvision's ToTensor + Normalize in float32, done in NumPy: elementwise IEEE
    float32, so bit-identical to the authors' transform, and it keeps the loader thread off torch's
    intra-op thread pool (which, shared with a model running in the main thread, slowed it 15-fold).
    The aspect ratio is not kept (the authors' Resize((size, size))).
    """
    if img.mode != "RGB":
        img = img.convert("RGB")
    arr = np.asarray(img.resize((size, size), Image.BILINEAR), dtype=np.float32)  # (size, size, 3)
    arr = (arr / np.float32(255) - _MEAN) / _STD
    return torch.from_numpy(np.ascontiguousarray(arr.transpose(2, 0, 1)))


_MEAN = np.array(IMAGENET_MEAN, dtype=np.float32)
_STD = np.array(IMAGENET_STD, dtype=np.float32)


def load_mask(path: str | os.PathLike, *, luminance: bool = False) -> np.ndarray:
    """The raw label array (H, W) uint8 of a mask file, for the dataset readers' own rules.

    Default (PASCAL, COCO; the authors' `np.array(Image.open(...))`): palette PNGs give their indices,
    grey PNGs their values, 1-bit PNGs 0/1. An RGB(A) file is accepted only when its colour channels are
    equal (a grey mask saved as RGB). `luminance=True` is the FSS-1000 rule, `.convert('L')`, which maps
    any mode (palette colours included) to grey levels.
    """
    return _labels(_open(path, "mask"), path, luminance)


def _labels(img: Image.Image, path: str | os.PathLike, luminance: bool, binary_16bit: bool = False) -> np.ndarray:
    """The label array of `img`; `binary_16bit` (a person's binary mask) reads a 16-bit mask of only 0 and 65535
    (black and white) as 0/255; any other value above 255 is refused (label maps keep their values, so theirs
    must stay within 0..255, and a 16-bit map of instance ids is no binary mask)."""
    if luminance:
        return np.array(img.convert("L"), dtype=np.uint8)
    if img.mode in ("1", "L", "P"):
        return np.asarray(img).astype(np.uint8)
    if img.mode in ("LA", "PA"):
        return np.asarray(img)[..., 0].astype(np.uint8)
    if img.mode in ("I", "I;16", "I;16B", "I;16L", "I;16N"):
        arr = np.asarray(img)
        if arr.size and (arr.min() < 0 or arr.max() > 255):
            if binary_16bit and np.isin(arr, (0, 65535)).all():
                return (arr // 257).astype(np.uint8)  # a black and white 16-bit mask: 0/255
            raise UserError(f"{path}: mask values range {arr.min()}..{arr.max()}, expected labels 0..255")
        return arr.astype(np.uint8)
    if img.mode in ("RGB", "RGBA"):
        arr = np.asarray(img)[..., :3]
        if (arr[..., 0] == arr[..., 1]).all() and (arr[..., 1] == arr[..., 2]).all():
            return np.ascontiguousarray(arr[..., 0], dtype=np.uint8)
        raise UserError(f"{path}: colour mask ({img.mode}); expected a palette, grey or 0/1 PNG of labels")
    raise UserError(f"{path}: unsupported mask mode {img.mode!r}; expected a palette, grey or 0/1 PNG")


def binary_mask(labels: np.ndarray, *, palette: bool = False) -> np.ndarray:
    """Foreground (bool) of a user's own mask, whatever convention the file follows.

    - palette PNG (`palette=True`): every index except 0 (background) and 255 (VOC's void border), unless
      0 and 255 are the only indices: then it is a black and white mask saved as a palette PNG (Pillow's
      `convert('P')` puts white at index 255), and 255 is the foreground;
    - values only 0/1: value 1;
    - otherwise a grey 0/255 mask, possibly antialiased: value >= 128 (the authors' FSS-1000 rule).
    A grey label map with small values (e.g. 0..20) is refused rather than silently read as empty.
    """
    if palette:
        if labels.size and not np.isin(labels, (0, IGNORE_LABEL)).all():
            return (labels != 0) & (labels != IGNORE_LABEL)
        return labels == IGNORE_LABEL
    top = int(labels.max()) if labels.size else 0
    if top <= 1:
        return labels > 0
    if top < 128:
        raise UserError(
            f"mask values go up to {top}: expected a binary mask (0/1 or 0/255) or a palette PNG"
        )
    return labels >= 128


def load_binary_mask(
    path: str | os.PathLike, *, require_foreground: bool = True, notes: list[str] | None = None,
    orient: bool = False,
) -> np.ndarray:
    """A user's mask file (e.g. `predict --support IMG MASK`) as float32 {0, 1} (H, W), per `binary_mask`.

    An empty support mask would make every support feature zero and the prediction meaningless, so by
    default it is an error naming the file. `notes`: gets a warning naming the file when the mask looks
    like no mask at all (most pixels grey, e.g. a photo or noise saved as the mask). A 16-bit black and white
    mask (0/65535) reads as 0/255. `orient`: turned by the mask file's own EXIF orientation, if it has one.
    """
    img = _open(path, "mask")
    if orient:
        img = orient_image(img, path)
    palette = img.mode in ("P", "PA")
    labels = _labels(img, path, luminance=False, binary_16bit=True)
    try:
        fg = binary_mask(labels, palette=palette)
    except UserError as exc:
        raise UserError(f"{path}: {exc}") from None
    if require_foreground and not fg.any():
        raise UserError(f"{path}: mask has no foreground pixels")
    if notes is not None and not palette and labels.size:
        grey = float(np.count_nonzero((labels > 1) & (labels < 255))) / labels.size
        if grey > GREY_MASK_SHARE:
            notes.append(f"{path}: {grey:.0%} of the mask's pixels are grey (neither 0 nor 255): is it a mask? "
                         "It is read as foreground where >= 128")
    return fg.astype(np.float32)


GREY_MASK_SHARE = 0.05  # antialiased edges of a real 0/255 mask stay well below this


def mask_to_tensor(mask: np.ndarray, size: int = IMG_SIZE) -> torch.Tensor:
    """(size, size) float32 via PyTorch's legacy nearest resize, as the authors resize every mask.

    Nearest is separable, so the source row and column indices are read off `F.interpolate` itself
    (applied to index vectors; its float32 rounding included) and the mask is gathered with them: the
    same pixels as interpolating the whole mask, without torch's thread pool. Works on raw labels too
    (nearest only selects pixels), so 255 ignore labels survive the resize.
    """
    if mask.ndim != 2:
        raise ValueError(f"mask must be 2-D (H, W), got shape {mask.shape}")
    rows, cols = _nearest_index(mask.shape[0], size), _nearest_index(mask.shape[1], size)
    return torch.from_numpy(np.asarray(mask, dtype=np.float32)[np.ix_(rows, cols)])


@functools.lru_cache(maxsize=256)
def _nearest_index(n_in: int, n_out: int) -> np.ndarray:
    src = torch.arange(n_in, dtype=torch.float32).view(1, 1, n_in, 1)  # exact: n_in < 2**24
    out = F.interpolate(src, size=(n_out, 1), mode="nearest")  # (1, 1, n_out, 1)
    index = out.view(-1).to(torch.int64).numpy()
    index.setflags(write=False)  # shared by the cache
    return index
