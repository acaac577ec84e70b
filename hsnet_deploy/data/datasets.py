"""Episode readers for FSS-1000, PASCAL-5i and COCO-20i: the authors' folder layouts, class splits and sampling.

Sampling reproduces the authors' test run (test.py seeds `np.random.seed(0)` right before the loop and
draws inside `__getitem__`, one episode after another, with no worker processes). A private
`np.random.RandomState(seed)` yields exactly the stream of the seeded legacy global RNG, and every draw
is made with the same call in the same order: `choice(n, 1, replace=False)` (which consumes a whole
permutation of n) once per support, redrawn while it equals the query. All episodes are sampled up front,
so loading them later, in any thread, cannot change the stream.

The split files are the authors' `data/splits` folder (fss/test.txt, pascal/val/fold{f}.txt,
coco/val/fold{f}.pkl), found in `splits_dir` or else `<data_root>/splits`.
"""

from __future__ import annotations

import io
import os
import pickle
from pathlib import Path

import numpy as np

from hsnet_deploy.data.episodes import Episode, EpisodeSet
from hsnet_deploy.data.preprocess import IGNORE_LABEL
from hsnet_deploy.errors import UserError

DATASETS = ("fss", "pascal", "coco")
NFOLDS = 4
EVAL_EPISODES = 1000  # authors' DatasetPASCAL / DatasetCOCO __len__ outside training
FSS_SUPPORT_IDS = range(1, 11)  # authors' data/fss.py: supports are <n>.jpg, n in 1..10, whatever the folder holds
FSS_SPLIT_OFFSET = {"trn": 0, "val": 520, "test": 760}  # authors' data/fss.py: class id = offset + sorted index

# Display names only: the label value in the masks is the class index + 1.
PASCAL_CLASSES = (
    "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow",
    "diningtable", "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa", "train", "tvmonitor",
)  # fmt: skip
COCO_CLASSES = (
    "person", "bicycle", "car", "motorcycle", "airplane", "bus", "train", "truck", "boat", "traffic light",
    "fire hydrant", "stop sign", "parking meter", "bench", "bird", "cat", "dog", "horse", "sheep", "cow",
    "elephant", "bear", "zebra", "giraffe", "backpack", "umbrella", "handbag", "tie", "suitcase", "frisbee",
    "skis", "snowboard", "sports ball", "kite", "baseball bat", "baseball glove", "skateboard", "surfboard",
    "tennis racket", "bottle", "wine glass", "cup", "fork", "knife", "spoon", "bowl", "banana", "apple",
    "sandwich", "orange", "broccoli", "carrot", "hot dog", "pizza", "donut", "cake", "chair", "couch",
    "potted plant", "bed", "dining table", "toilet", "tv", "laptop", "mouse", "remote", "keyboard",
    "cell phone", "microwave", "oven", "toaster", "sink", "refrigerator", "book", "clock", "vase", "scissors",
    "teddy bear", "hair drier", "toothbrush",
)  # fmt: skip


def build_episodes(
    dataset: str,
    data_root: str | os.PathLike,
    *,
    fold: int = 0,
    shots: int = 1,
    episodes: int | None = None,
    splits_dir: str | os.PathLike | None = None,
    seed: int = 0,
    check_files: bool = True,
) -> EpisodeSet:
    """The episodes of one benchmark; `episodes=N` keeps the first N of the authors' sequence."""
    kwargs = {"shots": shots, "episodes": episodes, "splits_dir": splits_dir, "seed": seed, "check_files": check_files}
    if dataset == "fss":
        if fold != 0:
            raise UserError(f"--fold {fold}: FSS-1000 has a single test split (fold 0)")
        return fss_episodes(data_root, **kwargs)
    if dataset == "pascal":
        return pascal_episodes(data_root, fold=fold, **kwargs)
    if dataset == "coco":
        return coco_episodes(data_root, fold=fold, **kwargs)
    raise UserError(f"dataset {dataset!r}: expected one of {', '.join(DATASETS)}")


# ---------------------------------------------------------------------------------------------- helpers


def _check_common(shots: int, episodes: int | None, fold: int | None = None) -> None:
    if shots < 1:
        raise UserError(f"--shots {shots}: must be at least 1")
    if episodes is not None and episodes < 1:
        raise UserError(f"--episodes {episodes}: must be at least 1")
    if fold is not None and not 0 <= fold < NFOLDS:
        raise UserError(f"--fold {fold}: must be 0..{NFOLDS - 1}")
    if fold is not None and episodes is not None and episodes > EVAL_EPISODES:
        raise UserError(f"--episodes {episodes}: the PASCAL-5i / COCO-20i test protocol has {EVAL_EPISODES} "
                        "episodes (the authors' sequence); give at most that")


def _dataset_dir(data_root: str | os.PathLike, name: str) -> Path:
    """`<data_root>/<name>` (the authors' --datapath layout), or data_root itself when it is that folder."""
    root = Path(data_root)
    if not root.is_dir():
        raise UserError(f"{root}: data root not found (expected a directory holding {name}/)")
    if (root / name).is_dir():
        return root / name
    if root.name == name:
        return root
    raise UserError(f"{root / name}: not found (expected the authors' layout DATA_ROOT/{name}/...)")


def _require_dir(path: Path, layout: str) -> Path:
    if not path.is_dir():
        raise UserError(f"{path}: not found (expected the authors' layout {layout})")
    return path


def _splits_file(data_root: str | os.PathLike, splits_dir: str | os.PathLike | None, rel: str) -> Path:
    """The authors' split file `<splits>/<rel>`; the error says where it was looked for."""
    if splits_dir is not None:
        base = Path(splits_dir)
        if not base.is_dir():
            raise UserError(f"{base}: splits directory not found (expected the authors' data/splits folder)")
    else:
        base = Path(data_root) / "splits"
    path = base / rel
    if not path.is_file():
        hint = "" if splits_dir is not None else " (copy the authors' data/splits folder there, or give --splits DIR)"
        raise UserError(f"{path}: split file not found{hint}")
    return path


def _read_lines(path: Path) -> list[str]:
    # Universal newlines: the authors' fss/*.txt files end lines with \r\n. Blank lines are skipped (the
    # authors drop only the last, empty, element after the final newline).
    # A byte-order mark (what Windows editors write) picks UTF-16 or is dropped; other bytes that are not UTF-8
    # mean this is not a split file.
    raw = path.read_bytes()
    codec = "utf-16" if raw[:2] in (b"\xff\xfe", b"\xfe\xff") else "utf-8-sig"
    try:
        text = raw.decode(codec)
    except UnicodeDecodeError as exc:
        shown = "UTF-16 (its byte-order mark says so)" if codec == "utf-16" else "UTF-8"
        raise UserError(f"{path}: not a readable split file (not {shown} text: byte {exc.start})") from None
    return [line.strip() for line in text.splitlines() if line.strip()]


def _draw(rng: np.random.RandomState, n: int) -> int:
    """One draw as the authors make it: `choice(pool, 1, replace=False)[0]` (a full permutation of n)."""
    return int(rng.choice(n, 1, replace=False)[0])


def _draw_supports(rng: np.random.RandomState, pool: list, query: object, shots: int) -> list:
    """Each support drawn separately from `pool`, redrawn while it equals the query: supports may repeat."""
    if all(item == query for item in pool):
        raise UserError(f"{query}: no other image of its class to use as support")
    supports: list = []
    while len(supports) < shots:
        item = pool[_draw(rng, len(pool))]
        if item != query:
            supports.append(item)
    return supports


def _check_exist(episodes: list[Episode]) -> None:
    """Fail before a long run, naming the first missing file, rather than halfway through it."""
    seen: set[Path] = set()
    for ep in episodes:
        for path in (ep.query_image, ep.query_mask, *ep.support_images, *ep.support_masks):
            if path not in seen:
                if not path.is_file():
                    raise UserError(f"{path}: file not found (episode {ep.index}, class {ep.class_name})")
                seen.add(path)


def _limit(total: int, episodes: int | None) -> int:
    return total if episodes is None else episodes


# ---------------------------------------------------------------------------------------------- FSS-1000


def fss_episodes(
    data_root: str | os.PathLike,
    *,
    shots: int = 1,
    episodes: int | None = None,
    splits_dir: str | os.PathLike | None = None,
    split: str = "test",
    seed: int = 0,
    check_files: bool = True,
) -> EpisodeSet:
    """FSS-1000 episodes: every image of the split is a query once, in sorted class then sorted path order.

    The test split is the authors' fixed list of 240 names (splits/fss/test.txt); it is NOT the last 240
    sorted names, so it cannot be derived from the folder. Without the split file, a folder with fewer
    than 1000 classes (a subset or a synthetic set) is taken whole as the test classes; a full one is an
    error.
    """
    _check_common(shots, episodes)
    if split not in FSS_SPLIT_OFFSET:
        raise UserError(f"split {split!r}: expected one of {', '.join(FSS_SPLIT_OFFSET)}")
    base = _dataset_dir(data_root, "FSS-1000")
    notes = []
    split_rel = f"fss/{split}.txt"
    has_splits = splits_dir is not None or (Path(data_root) / "splits" / split_rel).is_file()
    if has_splits:
        categories = sorted(_read_lines(_splits_file(data_root, splits_dir, split_rel)))
        offset = FSS_SPLIT_OFFSET[split]
    else:
        categories = sorted(p.name for p in base.iterdir() if p.is_dir() and not p.name.startswith("."))
        if not categories:
            raise UserError(f"{base}: no class folders (expected FSS-1000/<class>/<n>.jpg and <n>.png)")
        if len(categories) >= 1000:
            raise UserError(
                f"{Path(data_root) / 'splits' / split_rel}: split file not found; the FSS-1000 {split} split is "
                "the authors' fixed class list (copy their data/splits folder there, or give --splits DIR)"
            )
        offset = 0
        notes.append(f"no splits/{split_rel}: every one of the {len(categories)} class folders is a test class")

    queries: list[tuple[int, Path]] = []  # (class index, query image)
    without_queries = []
    for cls, name in enumerate(categories):
        class_dir = _require_dir(base / name, "FSS-1000/<class>/<n>.jpg")
        # The authors glob '<class>/*' (no dot files), sort the paths and keep names whose second
        # dot-separated part is 'jpg'.
        files = sorted(f for f in os.listdir(class_dir) if not f.startswith("."))
        found = [(cls, class_dir / f) for f in files if len(f.split(".")) > 1 and f.split(".")[1] == "jpg"]
        queries += found
        if not found:
            without_queries.append(name)
    if not queries:
        raise UserError(f"{base}: no query image in its {len(categories)} class folder(s); FSS-1000 images are "
                        "<class>/<n>.jpg (the authors' reader takes names whose second dot-separated part is 'jpg': "
                        "not .jpeg, not .JPG)")
    if without_queries:
        shown = ", ".join(without_queries[:5]) + (f" and {len(without_queries) - 5} more" if len(without_queries) > 5
                                                  else "")
        notes.append(f"{len(without_queries)} class folder(s) hold no <n>.jpg and give no episode: {shown}")
    n = _limit(len(queries), episodes)
    if n > len(queries):
        raise UserError(f"--episodes {n}: FSS-1000 {split} has {len(queries)} query images")

    rng = np.random.RandomState(seed)
    pool = [f"{k}.jpg" for k in FSS_SUPPORT_IDS]
    eps = []
    for idx, (cls, query) in enumerate(queries[:n]):
        supports = [query.parent / f for f in _draw_supports(rng, pool, query.name, shots)]
        eps.append(
            Episode(
                index=idx,
                class_id=offset + cls,
                class_name=categories[cls],
                query_image=query,
                query_mask=query.parent / (query.name.split(".")[0] + ".png"),
                support_images=tuple(supports),
                support_masks=tuple(p.with_suffix(".png") for p in supports),
            )
        )
    if check_files:
        _check_exist(eps)
    class_ids = tuple(offset + i for i in range(len(categories)))
    names = {offset + i: c for i, c in enumerate(categories)}
    return EpisodeSet("fss", 0, shots, class_ids, names, eps, notes)


# ---------------------------------------------------------------------------------------------- PASCAL-5i


def pascal_fold_classes(fold: int) -> list[int]:
    """Fold f tests classes 5f..5f+4 (0-based), authors' data/pascal.py build_class_ids."""
    return [fold * 5 + i for i in range(5)]


def pascal_episodes(
    data_root: str | os.PathLike,
    *,
    fold: int = 0,
    shots: int = 1,
    episodes: int | None = None,
    splits_dir: str | os.PathLike | None = None,
    seed: int = 0,
    check_files: bool = True,
) -> EpisodeSet:
    """PASCAL-5i: episode i's query is entry i % len of the fold's val list; supports come from that list's
    entries of the same class. Labels: class + 1; 255 is ignored."""
    _check_common(shots, episodes, fold)
    voc = _dataset_dir(data_root, "VOC2012")
    img_dir = _require_dir(voc / "JPEGImages", "VOC2012/JPEGImages/<id>.jpg")
    ann_dir = _require_dir(voc / "SegmentationClassAug", "VOC2012/SegmentationClassAug/<id>.png")
    split = _splits_file(data_root, splits_dir, f"pascal/val/fold{fold}.txt")
    class_ids = pascal_fold_classes(fold)

    metadata: list[tuple[str, int]] = []
    for lineno, line in enumerate(_read_lines(split), 1):
        name, sep, cc = line.partition("__")
        if not sep or not cc.isdigit():
            raise UserError(f"{split}:{lineno}: {line!r} is not '<image id>__<class 1..20>'")
        if int(cc) - 1 not in class_ids:
            raise UserError(f"{split}:{lineno}: class {cc} is not a fold-{fold} class ({class_ids[0] + 1}..{class_ids[-1] + 1})")
        metadata.append((name, int(cc) - 1))
    if not metadata:
        raise UserError(f"{split}: no entries")
    by_class: dict[int, list[str]] = {c: [] for c in class_ids}
    for name, cls in metadata:
        by_class[cls].append(name)

    rng = np.random.RandomState(seed)
    eps = []
    for idx in range(_limit(EVAL_EPISODES, episodes)):
        query, cls = metadata[idx % len(metadata)]  # the val lists are shorter than 1000: they cycle
        supports = _draw_supports(rng, by_class[cls], query, shots)
        eps.append(
            Episode(
                index=idx,
                class_id=cls,
                class_name=PASCAL_CLASSES[cls],
                query_image=img_dir / f"{query}.jpg",
                query_mask=ann_dir / f"{query}.png",
                support_images=tuple(img_dir / f"{s}.jpg" for s in supports),
                support_masks=tuple(ann_dir / f"{s}.png" for s in supports),
                fg_label=cls + 1,
                ignore_label=IGNORE_LABEL,
            )
        )
    if check_files:
        _check_exist(eps)
    return EpisodeSet("pascal", fold, shots, tuple(class_ids), {c: PASCAL_CLASSES[c] for c in class_ids}, eps)


# ---------------------------------------------------------------------------------------------- COCO-20i


def coco_fold_classes(fold: int) -> list[int]:
    """Fold f tests the interleaved classes f + 4v, v = 0..19 (authors' data/coco.py build_class_ids)."""
    return [fold + NFOLDS * v for v in range(20)]


class _PlainUnpickler(pickle.Unpickler):
    """The split .pkl holds only a dict of lists of strings: refuse any class, so a file cannot run code."""

    def find_class(self, module: str, name: str) -> type:
        raise pickle.UnpicklingError(f"refusing to load {module}.{name}")


def _read_coco_split(path: Path) -> dict[int, list[str]]:
    try:
        data = _PlainUnpickler(io.BytesIO(path.read_bytes())).load()
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError, IndexError) as exc:
        raise UserError(f"{path}: not a readable split file ({exc})") from None
    if not isinstance(data, dict) or not all(
        isinstance(k, int) and isinstance(v, list) and all(isinstance(s, str) for s in v) for k, v in data.items()
    ):
        raise UserError(f"{path}: expected a dict {{class index: [image path, ...]}}")
    return data


def coco_episodes(
    data_root: str | os.PathLike,
    *,
    fold: int = 0,
    shots: int = 1,
    episodes: int | None = None,
    splits_dir: str | os.PathLike | None = None,
    seed: int = 0,
    check_files: bool = True,
) -> EpisodeSet:
    """COCO-20i: each episode draws a fold class uniformly, then a query of that class, then each support.

    Image names in the split file are relative to COCO2014/ (e.g. val2014/<file>.jpg); the mask is
    COCO2014/annotations/<same name>.png with label = class + 1.
    """
    _check_common(shots, episodes, fold)
    base = _dataset_dir(data_root, "COCO2014")
    _require_dir(base / "annotations", "COCO2014/annotations/{train2014,val2014}/<file>.png")
    split = _splits_file(data_root, splits_dir, f"coco/val/fold{fold}.pkl")
    by_class = _read_coco_split(split)
    class_ids = coco_fold_classes(fold)
    for cls in class_ids:
        if len(set(by_class.get(cls, []))) < 2:
            raise UserError(f"{split}: class {cls} ({COCO_CLASSES[cls]}) needs at least 2 images, has "
                            f"{len(set(by_class.get(cls, [])))}")

    def mask_of(name: str) -> Path:
        return base / "annotations" / (name[: name.index(".jpg")] + ".png" if ".jpg" in name else name + ".png")

    rng = np.random.RandomState(seed)
    eps = []
    for idx in range(_limit(EVAL_EPISODES, episodes)):
        cls = class_ids[_draw(rng, len(class_ids))]
        pool = by_class[cls]
        query = pool[_draw(rng, len(pool))]
        supports = _draw_supports(rng, pool, query, shots)
        eps.append(
            Episode(
                index=idx,
                class_id=cls,
                class_name=COCO_CLASSES[cls],
                query_image=base / query,
                query_mask=mask_of(query),
                support_images=tuple(base / s for s in supports),
                support_masks=tuple(mask_of(s) for s in supports),
                fg_label=cls + 1,
            )
        )
    if check_files:
        _check_exist(eps)
    return EpisodeSet("coco", fold, shots, tuple(class_ids), {c: COCO_CLASSES[c] for c in class_ids}, eps)
