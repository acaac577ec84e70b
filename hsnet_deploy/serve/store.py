"""The bounded support-set store: preprocessed sets kept by id, least recently used evicted first.

An annotator registers a set once and then streams queries against it, so the set is kept preprocessed
(resized, normalised) rather than re-decoded per query; the bound (a count and a size in MB) keeps a
long-running service's memory flat however many sets clients register.
"""

from __future__ import annotations

import threading
import uuid
from collections import OrderedDict
from dataclasses import dataclass

import numpy as np


@dataclass
class SupportSet:
    images: np.ndarray  # (K, 3, S, S) float32
    masks: np.ndarray  # (K, S, S) float32 {0, 1}

    @property
    def shots(self) -> int:
        return int(self.images.shape[0])

    @property
    def nbytes(self) -> int:
        return int(self.images.nbytes + self.masks.nbytes)


class SetNotFound(KeyError):
    """An id the store does not hold; `evicted` says whether it was held once (a client can re-register)."""

    def __init__(self, set_id: str, evicted: bool):
        super().__init__(set_id)
        self.set_id, self.evicted = set_id, evicted

    def __str__(self) -> str:
        if self.evicted:
            return (f"support set {self.set_id!r} was evicted (least recently used, the store is full); "
                    "register it again with POST /support-sets")
        return f"unknown support set {self.set_id!r}; register one with POST /support-sets"


class SupportSetStore:
    """LRU over at most `max_sets` sets and `max_bytes` bytes. Thread-safe (the HTTP handlers share it)."""

    def __init__(self, max_sets: int, max_bytes: int, remember_evicted: int = 100_000):
        if max_sets < 1 or max_bytes < 1:
            raise ValueError("the store needs room for at least one set")
        self.max_sets, self.max_bytes = max_sets, max_bytes
        self._sets: OrderedDict[str, SupportSet] = OrderedDict()
        self._bytes = 0
        self._evicted: OrderedDict[str, None] = OrderedDict()  # bounded memory of evicted ids, for the 404 text
        self._remember = remember_evicted
        self._lock = threading.Lock()
        self.evictions = 0

    def add(self, support: SupportSet) -> str:
        """Store `support` under a new id, evicting the least recently used sets until it fits."""
        if support.nbytes > self.max_bytes:
            raise ValueError(f"a {support.shots}-shot set takes {support.nbytes / 2**20:.1f} MB, more than the "
                             f"store's {self.max_bytes / 2**20:.1f} MB")
        set_id = uuid.uuid4().hex
        with self._lock:
            while self._sets and (len(self._sets) >= self.max_sets or self._bytes + support.nbytes > self.max_bytes):
                old_id, old = self._sets.popitem(last=False)
                self._bytes -= old.nbytes
                self._evicted[old_id] = None
                self.evictions += 1
                if len(self._evicted) > self._remember:
                    self._evicted.popitem(last=False)
            self._sets[set_id] = support
            self._bytes += support.nbytes
        return set_id

    def get(self, set_id: str) -> SupportSet:
        """The set, now the most recently used; SetNotFound (evicted or unknown) otherwise."""
        with self._lock:
            support = self._sets.get(set_id)
            if support is None:
                raise SetNotFound(set_id, set_id in self._evicted)
            self._sets.move_to_end(set_id)
            return support

    def stats(self) -> dict:
        with self._lock:
            return {"sets": len(self._sets), "bytes": self._bytes, "mb": round(self._bytes / 2**20, 3),
                    "max_sets": self.max_sets, "max_mb": round(self.max_bytes / 2**20, 3),
                    "evictions": self.evictions}
