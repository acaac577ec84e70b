"""A backend-agnostic, resumable evaluation loop over an episode list.

`predict_fn(query_img (B,3,S,S), support_imgs (B,K,3,S,S), support_masks (B,K,S,S)) -> mask (B,S,S)`,
all float32 numpy, is the only thing it knows about the model, so eager PyTorch, ONNX Runtime and
TensorRT runners are evaluated by the same code. A background thread decodes and preprocesses the next
batches (bounded queue) while the current one runs.

Resuming: every `save_every` episodes, and when the loop is interrupted, the totals of the completed
batches, the next episode index and a fingerprint of the settings are written atomically to
`state_path`. Episodes are sampled up front and the metric sums integer counts, so a resumed run ends
with exactly the numbers of an uninterrupted one (given a deterministic predict_fn).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import queue
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
from rich.console import Console

from hsnet_deploy.artifacts import check_output_path, write_json_atomic
from hsnet_deploy.console import progress_bar
from hsnet_deploy.data.episodes import Episode, EpisodeSet, EpisodeTensors, load_episode
from hsnet_deploy.data.metrics import IoUAccumulator, area_counts
from hsnet_deploy.data.preprocess import IMG_SIZE
from hsnet_deploy.errors import UserError
from hsnet_deploy.model import mask_at_size

PredictFn = Callable[[np.ndarray, np.ndarray, np.ndarray], np.ndarray]
EpisodeHook = Callable[[int, Episode, EpisodeTensors, np.ndarray, tuple[np.ndarray, np.ndarray]], None]
STATE_FORMAT = "hsnet-deploy-eval-state/1"


@dataclass
class EvalResult:
    """Scores in percent (0..100), like the authors' logs; `class_iou` is keyed by the authors' class id."""

    dataset: str
    fold: int
    shots: int
    img_size: int
    episodes: int
    miou: float
    fb_iou: float
    class_iou: dict[int, float]
    class_names: dict[int, str]
    seconds: float  # wall time of the whole evaluation, summed over resumed runs
    inference_seconds: float  # time spent inside predict_fn
    resumed_from: int = 0  # first episode this call ran (0 unless resumed)
    original_size: bool = False
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["class_iou"] = {str(c): v for c, v in self.class_iou.items()}
        d["class_names"] = {str(c): v for c, v in self.class_names.items()}
        return d

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)


# ---------------------------------------------------------------------------------------------- loading


@dataclass
class _Batch:
    start: int
    episodes: list[Episode]
    query_img: np.ndarray  # (B, 3, S, S)
    support_imgs: np.ndarray  # (B, K, 3, S, S)
    support_masks: np.ndarray  # (B, K, S, S)
    tensors: list[EpisodeTensors]


class _Failure:
    def __init__(self, exc: BaseException) -> None:
        self.exc = exc


_DONE = object()


class _Prefetcher:
    """Loads batches into a bounded queue from a daemon thread, which fans the episodes out to a small
    pool (PIL decodes and resizes without the GIL); batches come out in episode order. An error while
    loading re-raises in the consumer."""

    def __init__(
        self, episodes: Sequence[Episode], start: int, batch: int, size: int, depth: int, workers: int
    ) -> None:
        self.episodes, self.start, self.batch, self.size = episodes, start, batch, size
        self.depth, self.workers = max(1, depth), max(1, workers)
        self.queue: queue.Queue = queue.Queue(maxsize=self.depth)
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, name="hsnet-eval-loader", daemon=True)
        self.thread.start()

    def _put(self, item: object) -> bool:
        while not self.stop.is_set():
            try:
                self.queue.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def _run(self) -> None:
        try:
            with ThreadPoolExecutor(self.workers, thread_name_prefix="hsnet-eval-load") as pool:
                pending: deque[tuple[int, list[Episode], list[Future]]] = deque()
                for i in range(self.start, len(self.episodes), self.batch):
                    eps = list(self.episodes[i : i + self.batch])
                    pending.append((i, eps, [pool.submit(load_episode, ep, self.size) for ep in eps]))
                    # Submitted but unqueued work stays bounded: `depth` batches beyond the queue's.
                    if len(pending) > self.depth and not self._put(_assemble(*pending.popleft())):
                        return
                while pending:
                    if not self._put(_assemble(*pending.popleft())):
                        return
            self._put(_DONE)
        except BaseException as exc:  # noqa: BLE001 - handed to the consumer, which re-raises it
            self._put(_Failure(exc))

    def __iter__(self) -> Iterator[_Batch]:
        while True:
            item = self.queue.get()
            if item is _DONE:
                return
            if isinstance(item, _Failure):
                raise item.exc
            yield item

    def close(self) -> None:
        self.stop.set()
        self.thread.join(timeout=10)


def _assemble(start: int, eps: list[Episode], futures: list[Future]) -> _Batch:
    ts = [f.result() for f in futures]
    return _Batch(
        start=start,
        episodes=eps,
        query_img=np.stack([t.query_img.numpy() for t in ts]),
        support_imgs=np.stack([t.support_imgs.numpy() for t in ts]),
        support_masks=np.stack([t.support_masks.numpy() for t in ts]),
        tensors=ts,
    )


# ---------------------------------------------------------------------------------------------- scoring


def _original_size_masks(logits: np.ndarray, tensors: list[EpisodeTensors]) -> list[np.ndarray]:
    """The authors' --use_original_imgsize: each query scored at its own size (model.mask_at_size)."""
    return [mask_at_size(np.ascontiguousarray(logits[b]), *t.query_mask_orig.shape).numpy()
            for b, t in enumerate(tensors)]


# ---------------------------------------------------------------------------------------------- state


def _fingerprint(settings: dict) -> str:
    return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()


def _load_state(path: Path, settings: dict) -> dict | None:
    if not path.exists():
        return None
    try:
        state = json.loads(path.read_text())
        if state.get("format") != STATE_FORMAT:
            raise ValueError(f"format {state.get('format')!r}")
    except (OSError, ValueError, AttributeError) as exc:
        raise UserError(f"{path}: not a readable evaluation state ({exc})") from None
    if state["fingerprint"] != _fingerprint(settings):
        saved = state.get("settings", {})
        diff = sorted(k for k in set(saved) | set(settings) if saved.get(k) != settings.get(k))
        raise UserError(
            f"{path}: saved by a run with other settings ({', '.join(diff)} differ); "
            "run without resume to start over"
        )
    return state


# ---------------------------------------------------------------------------------------------- loop


def evaluate(
    predict_fn: PredictFn,
    episodes: EpisodeSet | Sequence[Episode],
    *,
    batch: int = 1,
    img_size: int = IMG_SIZE,
    original_size: bool = False,
    state_path: str | os.PathLike | None = None,
    resume: bool = False,
    save_every: int = 50,
    fingerprint: dict | None = None,
    progress: bool = True,
    prefetch: int = 2,
    workers: int = 4,
    console: Console | None = None,
    on_episode: EpisodeHook | None = None,
) -> EvalResult:
    """Run every episode through `predict_fn` and score it with the authors' metric.

    - `original_size=True` (PASCAL and COCO, the authors' --use_original_imgsize): `predict_fn` must
      return the per-shot logits (B, K, 2, h, w) instead of the mask; IoU is computed at each query's
      own size. Default: the mask (B, S, S), scored at S x S against the nearest-resized query mask.
    - `on_episode(index, episode, tensors, prediction, (intersection, union))` sees every scored
      episode (e.g. to keep the best and worst for a report).
    - `fingerprint`: what else identifies the run (artifact hash, backend, precision); it joins the
      dataset settings in the fingerprint a resumed run must match.
    """
    if isinstance(episodes, EpisodeSet):
        eset = episodes
    else:
        eps = list(episodes)
        ids = tuple(sorted({e.class_id for e in eps}))
        names = {e.class_id: e.class_name for e in eps}
        eset = EpisodeSet("custom", 0, eps[0].shots if eps else 0, ids, names, eps)
    if batch < 1:
        raise UserError(f"--batch {batch}: must be at least 1")
    if original_size and eset.dataset == "fss":
        raise UserError("original-size evaluation is defined for PASCAL-5i and COCO-20i only (as the authors')")
    n = len(eset)

    settings = {
        "dataset": eset.dataset,
        "fold": eset.fold,
        "shots": eset.shots,
        "episodes": n,
        "episode_digest": eset.digest(),
        "img_size": img_size,
        "original_size": original_size,
        "batch": batch,
        **{f"run.{k}": v for k, v in (fingerprint or {}).items()},
    }
    acc = IoUAccumulator(eset.class_ids)
    start, prior_seconds, prior_infer = 0, 0.0, 0.0
    notes = list(eset.notes)
    state_file = check_output_path(state_path) if state_path is not None else None
    if state_file is not None and resume:
        state = _load_state(state_file, settings)
        if state is None:
            notes.append(f"no saved state at {state_file}: started from episode 0")
        else:
            acc = IoUAccumulator.from_dict(state["accumulator"])
            start = int(state["next_episode"])
            prior_seconds, prior_infer = float(state["seconds"]), float(state["inference_seconds"])

    t_start = time.perf_counter()
    infer_seconds = 0.0
    done = start

    def save() -> None:
        if state_file is None:
            return
        write_json_atomic(
            state_file,
            {
                "format": STATE_FORMAT,
                "fingerprint": _fingerprint(settings),
                "settings": settings,
                "next_episode": done,
                "complete": done >= n,
                "accumulator": acc.to_dict(),
                "seconds": prior_seconds + time.perf_counter() - t_start,
                "inference_seconds": prior_infer + infer_seconds,
            },
        )

    fold = "" if eset.dataset == "fss" else f" fold {eset.fold}"  # FSS-1000 has one test split, no folds
    bar = progress_bar(console=console, enabled=progress)
    loader = _Prefetcher(eset.episodes, start, batch, img_size, prefetch, workers) if start < n else None
    try:
        with bar:
            task = bar.add_task(f"{eset.dataset}{fold} {eset.shots}-shot", total=n, completed=start,
                                status=f"mIoU {_fmt(acc)}")
            for item in loader or ():
                t0 = time.perf_counter()
                out = np.asarray(predict_fn(item.query_img, item.support_imgs, item.support_masks))
                infer_seconds += time.perf_counter() - t0
                preds = _predictions(out, item, original_size, img_size)
                # Count the whole batch before adding any of it: the saved totals cover whole batches only.
                counts = [
                    area_counts(pred, t.query_mask_orig.numpy(), t.query_ignore_orig.numpy())
                    if original_size
                    else area_counts(pred, t.query_mask.numpy(), t.query_ignore.numpy())
                    for t, pred in zip(item.tensors, preds)
                ]
                for offset, (ep, (inter, union)) in enumerate(zip(item.episodes, counts)):
                    acc.add(ep.class_id, inter, union)
                    if on_episode is not None:
                        on_episode(item.start + offset, ep, item.tensors[offset], preds[offset], (inter, union))
                previous, done = done, item.start + len(item.episodes)
                bar.update(task, completed=done, status=f"mIoU {_fmt(acc)}")
                if done // save_every > previous // save_every:
                    save()
    except BaseException:
        with contextlib.suppress(OSError, UserError):  # never hide the error that stopped the run
            save()  # the completed batches; a resume continues from the first unfinished one
        raise
    finally:
        if loader is not None:
            loader.close()
    save()

    return EvalResult(
        dataset=eset.dataset,
        fold=eset.fold,
        shots=eset.shots,
        img_size=img_size,
        episodes=n,
        miou=acc.miou,
        fb_iou=acc.fb_iou,
        class_iou={c: v * 100 for c, v in acc.class_iou().items()},
        class_names={c: eset.class_names.get(c, str(c)) for c in acc.visited},
        seconds=prior_seconds + time.perf_counter() - t_start,
        inference_seconds=prior_infer + infer_seconds,
        resumed_from=start,
        original_size=original_size,
        notes=notes,
    )


def _predictions(out: np.ndarray, item: _Batch, original_size: bool, size: int) -> list[np.ndarray]:
    b, k = item.support_imgs.shape[:2]
    if original_size:
        if out.ndim != 5 or out.shape[:3] != (b, k, 2):
            raise ValueError(f"original-size evaluation needs logits (B={b}, K={k}, 2, h, w), got {out.shape}")
        return _original_size_masks(out, item.tensors)
    if out.shape != (b, size, size):
        raise ValueError(f"predict_fn returned shape {out.shape}, expected the mask ({b}, {size}, {size})")
    return list(out)


def _fmt(acc: IoUAccumulator) -> str:
    return f"{acc.miou:5.2f}" if acc.episodes else "  -  "
