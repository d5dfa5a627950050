"""A small thread-safe LRU bounded by entry count and by bytes (embeddings, low-res logits)."""

from __future__ import annotations

import threading
from collections import OrderedDict
from typing import Any, Callable, Generic, TypeVar

V = TypeVar("V")


class LRU(Generic[V]):
    """``max_items`` entries and ``max_bytes`` in all, whichever is hit first; the least recently
    used entries go first. An entry larger than ``max_bytes`` is still kept alone (the newest one
    must stay usable), so the bound is ``max(max_bytes, largest entry)``."""

    def __init__(self, max_items: int, max_bytes: int, size_of: Callable[[V], int]) -> None:
        if max_items < 1 or max_bytes < 1:
            raise ValueError("an LRU needs max_items >= 1 and max_bytes >= 1")
        self.max_items, self.max_bytes, self._size_of = max_items, max_bytes, size_of
        self._data: OrderedDict[str, tuple[V, int]] = OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()  # the event loop and the model thread both touch it

    def get(self, key: str) -> V | None:
        with self._lock:
            item = self._data.get(key)
            if item is None:
                return None
            self._data.move_to_end(key)
            return item[0]

    def put(self, key: str, value: V) -> None:
        size = int(self._size_of(value))
        with self._lock:
            old = self._data.pop(key, None)
            if old is not None:
                self._bytes -= old[1]
            self._data[key] = (value, size)
            self._bytes += size
            while len(self._data) > 1 and (len(self._data) > self.max_items or self._bytes > self.max_bytes):
                _, (_, s) = self._data.popitem(last=False)
                self._bytes -= s

    def __contains__(self, key: str) -> bool:
        with self._lock:
            return key in self._data

    def __len__(self) -> int:
        with self._lock:
            return len(self._data)

    @property
    def nbytes(self) -> int:
        with self._lock:
            return self._bytes

    def stats(self) -> dict[str, Any]:
        with self._lock:
            return dict(items=len(self._data), bytes=self._bytes, max_items=self.max_items, max_bytes=self.max_bytes)
