"""The one episode type, the list a benchmark reader returns, and loading an episode into tensors.

Episodes hold only paths and labels: sampling (cheap, and the RNG stream must follow episode order)
is done up front by `datasets.py`; decoding images (slow) happens later, possibly in another thread,
without touching any random state.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

from hsnet_deploy.data.preprocess import (
    IMG_SIZE,
    fit_mask_to_image,
    image_to_tensor,
    load_binary_mask,
    load_image,
    load_mask,
    mask_to_tensor,
)


@dataclass(frozen=True)
class Episode:
    """One few-shot episode: a query and K supports of one class, for `eval`, calibration and the gate.

    `fg_label` is the mask value that marks the class (PASCAL, COCO: class id + 1); None means the
    FSS-1000 rule (grey level >= 128). `ignore_label` (PASCAL: 255) marks pixels left out of the IoU
    and turned into background in support masks. `user_masks`: a person's own 0/1, 0/255 or palette
    masks (the calibration folder layout), read as `predict` reads them; the query mask may then be
    missing (no ground truth). `label` names the episode in reports (default: class/query#index).
    """

    index: int
    class_id: int
    class_name: str
    query_image: Path
    query_mask: Path | None
    support_images: tuple[Path, ...]
    support_masks: tuple[Path, ...]
    fg_label: int | None = None
    ignore_label: int | None = None
    user_masks: bool = False
    label: str = ""

    @property
    def shots(self) -> int:
        return len(self.support_images)

    @property
    def name(self) -> str:
        return self.label or f"{self.class_name}/{self.query_image.name}#{self.index}"

    def to_dict(self) -> dict:
        d = asdict(self)
        d["query_image"], d["query_mask"] = str(self.query_image), self.query_mask and str(self.query_mask)
        d["support_images"] = [str(p) for p in self.support_images]
        d["support_masks"] = [str(p) for p in self.support_masks]
        for key in ("user_masks", "label"):  # benchmark episodes keep the digest earlier versions saved
            if not d[key]:
                del d[key]
        return d


@dataclass
class EpisodeSet:
    """A benchmark's episode list with what the metric needs: the fold's class ids and names."""

    dataset: str
    fold: int
    shots: int
    class_ids: tuple[int, ...]
    class_names: dict[int, str]
    episodes: list[Episode]
    notes: list[str] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.episodes)

    def digest(self) -> str:
        """sha256 of every episode's paths and labels: changes with the data root, split files, seed or K."""
        h = hashlib.sha256()
        for ep in self.episodes:
            h.update(json.dumps(ep.to_dict(), sort_keys=True).encode())
        return h.hexdigest()


@dataclass
class EpisodeTensors:
    """An episode ready for the model. Masks are float32 {0, 1}; ignore masks are bool."""

    query_img: torch.Tensor  # (3, S, S)
    support_imgs: torch.Tensor  # (K, 3, S, S)
    support_masks: torch.Tensor  # (K, S, S)
    query_mask: torch.Tensor | None  # (S, S), nearest-resized; None: no ground truth (user_masks only)
    query_ignore: torch.Tensor | None  # (S, S) bool
    query_mask_orig: torch.Tensor | None  # (H0, W0), the query's own size
    query_ignore_orig: torch.Tensor | None  # (H0, W0) bool


def _binarise(labels: np.ndarray, ep: Episode) -> tuple[np.ndarray, np.ndarray]:
    """(foreground, ignore) as float32 and bool, by the episode's dataset rule."""
    if ep.fg_label is None:
        fg = labels >= 128  # authors' data/fss.py read_mask
    else:
        fg = labels == ep.fg_label
    if ep.ignore_label is None:
        ignore = np.zeros(labels.shape, dtype=bool)
    else:
        ignore = labels == ep.ignore_label
    return fg.astype(np.float32), ignore


def load_episode(ep: Episode, size: int = IMG_SIZE) -> EpisodeTensors:
    """Decode and preprocess one episode as the authors' readers do (errors name the missing file)."""
    if ep.user_masks:
        return _load_user_episode(ep, size)
    luminance = ep.fg_label is None  # FSS-1000 masks are read through .convert('L')

    q_labels = load_mask(ep.query_mask, luminance=luminance)
    q_fg, q_ign = _binarise(q_labels, ep)
    # Resizing the raw labels then binarising equals binarising then resizing: nearest only selects pixels.
    q_fg_s, q_ign_s = _binarise(mask_to_tensor(q_labels, size).to(torch.uint8).numpy(), ep)

    s_masks = []
    for mask_path in ep.support_masks:
        fg, _ = _binarise(load_mask(mask_path, luminance=luminance), ep)  # ignore (255) -> background
        s_masks.append(mask_to_tensor(fg, size))
    return _tensors(load_image(ep.query_image), [load_image(p) for p in ep.support_images], size, s_masks,
                    torch.from_numpy(q_fg_s), torch.from_numpy(q_ign_s), torch.from_numpy(q_fg), torch.from_numpy(q_ign))


def _load_user_episode(ep: Episode, size: int) -> EpisodeTensors:
    """A person's own photos and masks (calibration folders), read as `predict` reads them: photos turned by their
    EXIF orientation, each mask fitted to its photo; nothing is ignored."""
    s_photos = [load_image(p, orient=True) for p in ep.support_images]
    s_masks = [mask_to_tensor(fit_mask_to_image(load_binary_mask(m, orient=True), photo, str(m), str(p)), size)
               for photo, p, m in zip(s_photos, ep.support_images, ep.support_masks, strict=True)]
    query = load_image(ep.query_image, orient=True)
    if ep.query_mask is None:
        return _tensors(query, s_photos, size, s_masks, None, None, None, None)
    q_fg = fit_mask_to_image(load_binary_mask(ep.query_mask, require_foreground=False, orient=True), query,
                             str(ep.query_mask), str(ep.query_image))
    q_ign = np.zeros(q_fg.shape, dtype=bool)
    return _tensors(query, s_photos, size, s_masks, mask_to_tensor(q_fg, size),
                    torch.zeros((size, size), dtype=torch.bool), torch.from_numpy(q_fg), torch.from_numpy(q_ign))


def _tensors(query, supports: list, size: int, s_masks: list[torch.Tensor], *query_truth) -> EpisodeTensors:
    """The episode's tensors from its decoded query and support images (PIL) and its resized masks."""
    s_imgs = [image_to_tensor(img, size) for img in supports]
    return EpisodeTensors(
        query_img=image_to_tensor(query, size),
        # np.stack, not torch.stack: loader threads stay off torch's intra-op pool (see image_to_tensor)
        support_imgs=torch.from_numpy(np.stack([t.numpy() for t in s_imgs])),
        support_masks=torch.from_numpy(np.stack([t.numpy() for t in s_masks])),
        query_mask=query_truth[0], query_ignore=query_truth[1],
        query_mask_orig=query_truth[2], query_ignore_orig=query_truth[3],
    )
