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
from typing import NamedTuple

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


def split_name(dataset: str, fold: int | None) -> str:
    """The test split a run evaluates, in the progress bar and in messages: `fss`, `pascal fold 2` (FSS-1000 has one
    test split, no folds)."""
    return dataset if dataset == "fss" else f"{dataset} fold {fold}"


class SavedRun(NamedTuple):
    """An unfinished run's state file: episodes counted, episodes in all, and what was evaluated (split, shots)."""

    counted: int
    total: int
    name: str


def interrupted_run(path: str | os.PathLike) -> SavedRun | None:
    """The unfinished run saved at `path`; None when there is no file or its run finished; a UserError when the
    file is no evaluation state."""
    path = Path(path)
    if not path.is_file():
        return None
    try:
        saved = json.loads(path.read_text())
        if saved.get("complete"):
            return None
        settings = saved["settings"]
        name = f"{split_name(settings.get('dataset', '?'), settings.get('fold'))}, {settings.get('shots', '?')}-shot"
        return SavedRun(int(saved["next_episode"]), int(settings["episodes"]), name)
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        raise UserError(f"{path}: exists and is no evaluation state; move it away or give another --state") from None


class StateRefused(UserError):
    """The state file itself cannot be resumed by this run (unreadable, or saved with other settings): no episode
    ran, so the advice for a run stopped part-way by a bad data file does not apply."""


def _load_state(path: Path, settings: dict) -> dict | None:
    if not path.exists():
        return None
    try:
        state = json.loads(path.read_text())
        if state.get("format") != STATE_FORMAT:
            raise ValueError(f"format {state.get('format')!r}")
    except (OSError, ValueError, AttributeError) as exc:
        raise StateRefused(f"{path}: not a readable evaluation state ({exc})") from None
    if state["fingerprint"] != _fingerprint(settings):
        saved = state.get("settings", {})
        diff = sorted(k for k in set(saved) | set(settings) if saved.get(k) != settings.get(k))
        values = [f"{k} {saved.get(k)} saved, {settings.get(k)} now" for k in diff
                  if not k.endswith(("digest", "sha256")) and len(str(saved.get(k))) < 40]
        raise StateRefused(
            f"{path}: saved by a run with other settings ({', '.join(diff)} differ"
            + (f": {'; '.join(values)}" if values else "") + "); resume with the saved settings (a resumed run "
            "repeats the same calls, so its totals equal an uninterrupted run's), or delete the file to start over"
        )
    return state


# ---------------------------------------------------------------------------------------------- loop


class _RunState:
    """What a run has counted so far, and where it is saved: the state a resume continues from."""

    def __init__(self, eset: EpisodeSet, settings: dict, state_path: str | os.PathLike | None, resume: bool):
        self.settings = settings
        self.total = len(eset)
        self.acc = IoUAccumulator(eset.class_ids)
        self.start = self.done = 0
        self.prior_seconds = self.prior_infer = self.infer_seconds = 0.0
        self.notes = list(eset.notes)
        self.state_file = check_output_path(state_path) if state_path is not None else None
        if self.state_file is not None and resume:
            self._resume()
        self.t_start = time.perf_counter()

    def _resume(self) -> None:
        state = _load_state(self.state_file, self.settings)
        if state is None:
            self.notes.append(f"no saved state at {self.state_file}: started from episode 0")
            return
        self.acc = IoUAccumulator.from_dict(state["accumulator"])
        self.start = self.done = int(state["next_episode"])
        self.prior_seconds, self.prior_infer = float(state["seconds"]), float(state["inference_seconds"])

    @property
    def seconds(self) -> float:
        return self.prior_seconds + time.perf_counter() - self.t_start

    def add_batch(self, item: _Batch, counts: list[tuple[np.ndarray, np.ndarray]], save_every: int) -> None:
        """Count a whole batch at once (the saved totals cover whole batches only); save every `save_every`."""
        for ep, (inter, union) in zip(item.episodes, counts):
            self.acc.add(ep.class_id, inter, union)
        previous, self.done = self.done, item.start + len(item.episodes)
        if self.done // save_every > previous // save_every:
            self.save()

    def save(self) -> None:
        if self.state_file is None:
            return
        write_json_atomic(self.state_file, {
            "format": STATE_FORMAT,
            "fingerprint": _fingerprint(self.settings),
            "settings": self.settings,
            "next_episode": self.done,
            "complete": self.done >= self.total,
            "accumulator": self.acc.to_dict(),
            "seconds": self.seconds,
            "inference_seconds": self.prior_infer + self.infer_seconds,
        })

    def result(self, eset: EpisodeSet, img_size: int, original_size: bool) -> EvalResult:
        return EvalResult(
            dataset=eset.dataset, fold=eset.fold, shots=eset.shots, img_size=img_size, episodes=self.total,
            miou=self.acc.miou, fb_iou=self.acc.fb_iou,
            class_iou={c: v * 100 for c, v in self.acc.class_iou().items()},
            class_names={c: eset.class_names.get(c, str(c)) for c in self.acc.visited},
            seconds=self.seconds, inference_seconds=self.prior_infer + self.infer_seconds,
            resumed_from=self.start, original_size=original_size, notes=self.notes,
        )


def _episode_set(episodes: EpisodeSet | Sequence[Episode]) -> EpisodeSet:
    if isinstance(episodes, EpisodeSet):
        return episodes
    eps = list(episodes)
    ids = tuple(sorted({e.class_id for e in eps}))
    names = {e.class_id: e.class_name for e in eps}
    return EpisodeSet("custom", 0, eps[0].shots if eps else 0, ids, names, eps)


def _settings(eset: EpisodeSet, img_size: int, original_size: bool, batch: int, fingerprint: dict | None) -> dict:
    """What a resumed run must share with the saved one."""
    return {
        "dataset": eset.dataset, "fold": eset.fold, "shots": eset.shots, "episodes": len(eset),
        "episode_digest": eset.digest(), "img_size": img_size, "original_size": original_size, "batch": batch,
        **{f"run.{k}": v for k, v in (fingerprint or {}).items()},
    }


def _score(item: _Batch, preds: list[np.ndarray], original_size: bool) -> list[tuple[np.ndarray, np.ndarray]]:
    """(intersection, union) per episode, at the query's own size or at S x S."""
    return [
        area_counts(pred, t.query_mask_orig.numpy(), t.query_ignore_orig.numpy()) if original_size
        else area_counts(pred, t.query_mask.numpy(), t.query_ignore.numpy())
        for t, pred in zip(item.tensors, preds)
    ]


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
    eset = _episode_set(episodes)
    if batch < 1:
        raise UserError(f"--batch {batch}: must be at least 1")
    if original_size and eset.dataset == "fss":
        raise UserError("original-size evaluation is defined for PASCAL-5i and COCO-20i only (as the authors')")
    run = _RunState(eset, _settings(eset, img_size, original_size, batch, fingerprint), state_path, resume)

    bar = progress_bar(console=console, enabled=progress)
    loader = (_Prefetcher(eset.episodes, run.start, batch, img_size, prefetch, workers)
              if run.start < run.total else None)
    try:
        with bar:
            task = bar.add_task(f"{split_name(eset.dataset, eset.fold)} {eset.shots}-shot", total=run.total,
                                completed=run.start,
                                status=f"mIoU {_fmt(run.acc)}")
            for item in loader or ():
                t0 = time.perf_counter()
                out = np.asarray(predict_fn(item.query_img, item.support_imgs, item.support_masks))
                run.infer_seconds += time.perf_counter() - t0
                preds = _predictions(out, item, original_size, img_size)
                counts = _score(item, preds, original_size)
                run.add_batch(item, counts, save_every)
                if on_episode is not None:
                    for offset, (ep, area) in enumerate(zip(item.episodes, counts)):
                        on_episode(item.start + offset, ep, item.tensors[offset], preds[offset], area)
                bar.update(task, completed=run.done, status=f"mIoU {_fmt(run.acc)}")
    except BaseException:
        with contextlib.suppress(OSError, UserError):  # never hide the error that stopped the run
            run.save()  # the completed batches; a resume continues from the first unfinished one
        raise
    finally:
        if loader is not None:
            loader.close()
    run.save()
    return run.result(eset, img_size, original_size)


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
