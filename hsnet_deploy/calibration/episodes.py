"""Calibration and gate episodes from a directory: a benchmark layout, or the simple layout below.

Layouts, detected in this order:
- FSS-1000 (`DIR/FSS-1000/<class>/<n>.jpg + <n>.png`), PASCAL-5i (`DIR/VOC2012/...`) or COCO-20i
  (`DIR/COCO2014/...`), read by `hsnet_deploy.data.datasets` with the authors' splits (`DIR/splits`);
- the simple layout, one folder per episode (sorted by name)::

      CALIB_DIR/
        <episode>/
          query.jpg           the query image (.jpg .jpeg .png .bmp .webp)
          query_mask.png      optional ground truth; with it the gate also reports mIoU
          support1.jpg        one or more supports (support1, support2, ...), each with
          support1_mask.png   its mask: 0/1, 0/255 grey or palette PNG, same size as its image

Both sets are drawn from one seeded shuffle of the available episodes (one per distinct query image): the
gate takes the first M, calibration the next N, so the two share no episode and no query, and the gate's
episodes depend only on the seed and M: an FP16 and an INT8 variant gate on the same episodes whatever
calibration takes. The benchmark readers sample episodes exactly as the authors do; repeated queries (PASCAL's
1,000 episodes cycle through a few hundred images) count once.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from hsnet_deploy.data.episodes import Episode
from hsnet_deploy.errors import UserError

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp")
BENCHMARK_DIRS = (("fss", "FSS-1000"), ("pascal", "VOC2012"), ("coco", "COCO2014"))
MIN_CALIB_EPISODES = 1
MIN_GATE_EPISODES = 1


@dataclass
class EpisodeSample:
    """One episode as arrays (B = 1): the feed of the ONNX model, plus ground truth when there is one."""

    name: str
    class_id: int
    feed: dict[str, np.ndarray]  # query_img (1,3,S,S), support_imgs (1,K,3,S,S), support_masks (1,K,S,S)
    query_mask: np.ndarray | None  # (S, S) float32 {0,1}
    ignore: np.ndarray | None  # (S, S) bool


@dataclass
class EpisodeSplit:
    """The disjoint calibration and gate sets drawn from one directory."""

    layout: str
    root: Path
    calib: list[Episode]
    gate: list[Episode]
    seed: int
    available: int

    @property
    def has_ground_truth(self) -> bool:
        """Whether any gate episode has a query mask: the gate measures mIoU over those (gate.run_gate)."""
        return self.ground_truth_episodes > 0

    @property
    def ground_truth_episodes(self) -> int:
        return sum(ep.query_mask is not None for ep in self.gate)

    def class_ids(self) -> tuple[int, ...]:
        return tuple(sorted({ep.class_id for ep in self.gate}))

    def info(self) -> dict:
        """What the metadata records: enough to tell which data a variant was calibrated and gated on."""
        digest = hashlib.sha256()
        for ep in [*self.calib, *self.gate]:
            digest.update(json.dumps(ep.to_dict(), sort_keys=True).encode())
        return {"layout": self.layout, "root": str(self.root), "seed": self.seed, "available": self.available,
                "calib_episodes": len(self.calib), "gate_episodes": len(self.gate),
                "ground_truth": self.has_ground_truth, "ground_truth_episodes": self.ground_truth_episodes,
                "sha256": digest.hexdigest()}


def detect_layout(root: Path) -> str:
    """'fss' | 'pascal' | 'coco' | 'simple', or a UserError naming what was expected."""
    if not root.is_dir():
        raise UserError(f"{root}: calibration directory not found")
    for layout, name in BENCHMARK_DIRS:
        if (root / name).is_dir() or root.name == name:
            return layout
    if any(_episode_dirs(root)):
        return "simple"
    raise UserError(
        f"{root}: no calibration episodes; expected FSS-1000/, VOC2012/ or COCO2014/ (the benchmark layouts) "
        "or one folder per episode holding query.jpg and support1.jpg + support1_mask.png"
    )


def _episode_dirs(root: Path) -> list[tuple[Path, list[Path]]]:
    """The episode folders, each with its files (listed once): those holding a query image. A folder with episode
    files but no query image it can read (e.g. `query.tif`) is an error naming it, not skipped without a word."""
    folders = []
    for p in sorted(root.iterdir()):
        if not p.is_dir() or p.name.startswith("."):
            continue
        files = sorted(f for f in p.iterdir() if f.is_file())
        if _find(files, "query"):
            folders.append((p, files))
        elif _find(files, "support1") or any(f.stem.lower() == "query" for f in files):
            raise UserError(f"{p}: episode folder without a query image ({', '.join(IMAGE_SUFFIXES)}, any case)")
    return folders


def _find(files: list[Path], stem: str) -> Path | None:
    """`<stem><suffix>` among a folder's files, for an image suffix in any case (query.jpg, query.JPG, query.Jpg)."""
    return next((f for f in files if f.stem == stem and f.suffix.lower() in IMAGE_SUFFIXES), None)


def _support_number(stem: str) -> int | None:
    """N of a `support<N>` image's stem (not of its `_mask`), else None."""
    digits = stem.removeprefix("support")
    return int(digits) if digits != stem and digits.isascii() and digits.isdecimal() else None


def simple_episodes(root: Path) -> list[Episode]:
    """The simple layout; a folder with a query but no complete support pair is an error, not skipped."""
    episodes = []
    for folder, files in _episode_dirs(root):
        query = _find(files, "query")
        supports, masks = [], []
        i = 1
        while (img := _find(files, f"support{i}")) is not None:
            mask = _find(files, f"support{i}_mask")
            if mask is None:
                raise UserError(f"{img}: support image without its mask {folder / f'support{i}_mask.png'}")
            supports.append(img)
            masks.append(mask)
            i += 1
        if not supports:
            raise UserError(f"{folder}: episode without supports (expected support1.jpg and support1_mask.png)")
        beyond = sorted((n, f) for f in files if f.suffix.lower() in IMAGE_SUFFIXES
                        and (n := _support_number(f.stem)) is not None and n > i - 1)
        if beyond:
            number, path = beyond[0]
            if path.stem != f"support{number}":  # support02: a leading zero, not a gap
                raise UserError(f"{path}: write support numbers without leading zeros (support{number}); "
                                "number the supports support1, support2, ...")
            raise UserError(f"{path}: support{i} is missing before it; number the supports support1, support2, "
                            "... without gaps")
        episodes.append(Episode(len(episodes), 0, "episode", query, _find(files, "query_mask"), tuple(supports),
                                tuple(masks), user_masks=True, label=folder.name))
    return episodes


def benchmark_episodes(layout: str, root: Path, fold: int, seed: int) -> list[Episode]:
    """The authors' episode sequence of a benchmark (1-shot); K-shot gating is not what the variant changes."""
    from hsnet_deploy.data.datasets import build_episodes

    base = root.parent if root.name == dict(BENCHMARK_DIRS)[layout] else root
    episode_set = build_episodes(layout, base, fold=fold, shots=1, seed=seed, check_files=True)
    return list(episode_set.episodes)


def split_episodes(
    calib_dir: str | os.PathLike,
    calib_episodes: int,
    gate_episodes: int,
    seed: int = 0,
    fold: int = 0,
    calibrate: bool = True,
) -> EpisodeSplit:
    """Seeded, disjoint calibration and gate sets; too few episodes for both is a UserError.

    `calibrate=False` (FP16, which calibrates nothing): the gate's episodes only. The gate comes first in the
    shuffle, so it is the same for FP16 and INT8 with the same seed and gate count.
    """
    if calibrate and calib_episodes < MIN_CALIB_EPISODES:
        raise UserError(f"--calib-episodes {calib_episodes}: must be at least {MIN_CALIB_EPISODES}")
    if gate_episodes < MIN_GATE_EPISODES:
        raise UserError(f"--gate-episodes {gate_episodes}: must be at least {MIN_GATE_EPISODES}")
    root = Path(calib_dir)
    layout = detect_layout(root)
    pool = simple_episodes(root) if layout == "simple" else benchmark_episodes(layout, root, fold, seed)
    # One episode per query image: a repeated query in both sets would leak calibration into the gate.
    unique: dict[Path, Episode] = {}
    for ep in pool:
        unique.setdefault(ep.query_image, ep)
    pool = list(unique.values())
    if not calibrate:
        calib_episodes = 0
    need = calib_episodes + gate_episodes
    if len(pool) < need:
        raise UserError(
            f"{root}: {len(pool)} episodes with distinct queries, fewer than the {need} needed "
            f"(--calib-episodes {calib_episodes} + --gate-episodes {gate_episodes})"
        )
    order = np.random.RandomState(seed).permutation(len(pool))
    chosen = [pool[i] for i in order[:need]]
    split = EpisodeSplit(layout, root, chosen[gate_episodes:], chosen[:gate_episodes], seed, len(pool))
    # A person's folders are all checked, so a wrong pairing is named whatever the seed draws; a benchmark's
    # thousands of files only where drawn (they are the authors' data, and eval reads them as they are).
    for ep in pool if layout == "simple" else [*split.calib, *split.gate]:
        check_episode_files(ep)
    return split


def check_episode_files(ep: Episode) -> None:
    """Every mask must be its image's size: a mismatch means a wrong pairing, not something to resize away.

    Headers only. A simple-layout folder holds a person's photos, read as `predict` reads them: sizes as shown
    (EXIF orientation), and a mask of a turned photo's stored size fits too (`fit_mask_to_image`). Benchmark
    files are compared as stored, as the authors' readers (which ignore EXIF) read them."""
    from hsnet_deploy.data.preprocess import turned_size

    pairs = [(ep.query_image, ep.query_mask), *zip(ep.support_images, ep.support_masks)]
    for img, mask in pairs:
        if mask is None:
            continue
        (img_size, img_turn), (mask_size, mask_turn) = _header(img, ep), _header(mask, ep)
        fits = mask_size == img_size  # benchmark files: as stored
        if ep.user_masks:  # as shown; a mask drawn on a turned photo's stored pixels fits too
            stored = img_size
            img_size, mask_size = turned_size(img_size, img_turn), turned_size(mask_size, mask_turn)
            fits = mask_size == img_size or (img_turn >= 5 and mask_size == stored)
        if not fits:
            raise UserError(
                f"{mask}: mask is {mask_size[0]}x{mask_size[1]} but its image {img.name} is "
                f"{img_size[0]}x{img_size[1]} (episode {ep.name})"
            )


def _header(path: Path, ep: Episode) -> tuple[tuple[int, int], int]:
    from hsnet_deploy.data.preprocess import header_size

    try:
        return header_size(path)
    except UserError as exc:
        raise UserError(f"{exc} (episode {ep.name})") from None


def load_sample(ep: Episode, size: int) -> EpisodeSample:
    """Decode and preprocess exactly as `eval` does (PIL bilinear images, legacy-nearest masks)."""
    from hsnet_deploy.data.episodes import load_episode

    t = load_episode(ep, size)
    feed = {"query_img": t.query_img[None].numpy(), "support_imgs": t.support_imgs[None].numpy(),
            "support_masks": t.support_masks[None].numpy()}
    return EpisodeSample(ep.name, ep.class_id, feed, None if t.query_mask is None else t.query_mask.numpy(),
                         None if t.query_ignore is None else t.query_ignore.numpy())


def one_shot_feeds(sample: EpisodeSample) -> list[dict[str, np.ndarray]]:
    """Each support of an episode as its own 1-shot feed: K-shot runs every shot through the same network,
    so calibrating on 1-shot feeds covers K-shot inference, and fixed shapes keep calibrators simple."""
    feed = sample.feed
    return [{"query_img": feed["query_img"], "support_imgs": feed["support_imgs"][:, i : i + 1],
             "support_masks": feed["support_masks"][:, i : i + 1]} for i in range(feed["support_imgs"].shape[1])]
