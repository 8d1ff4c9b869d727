"""A few objects loaded from model files, remembered by path and the file's stamp: re-running a graph does not
read the file again, an edited file is read again (and its old copies dropped), and only the newest few stay."""
from __future__ import annotations

import threading
from collections import OrderedDict
from typing import Callable


class FileCache:
    def __init__(self, size: int):
        self.size = size
        self._items: OrderedDict[tuple, object] = OrderedDict()  # (path, stamp, variant) -> object, newest last
        self._lock = threading.Lock()

    def get(self, path, stamp, load: Callable[[], object], variant: tuple = ()):
        """The object loaded from `path` at `stamp` (e.g. its mtime) for `variant` (e.g. dtype and device);
        `load()` runs only when it is not cached."""
        key = (str(path), stamp, variant)
        with self._lock:
            if key in self._items:
                self._items.move_to_end(key)
                return self._items[key]
        value = load()  # outside the lock: loading can take long
        with self._lock:
            for old in [k for k in self._items if k[0] == key[0] and k[1] != stamp]:  # the file changed since
                del self._items[old]
            self._items[key] = value
            while len(self._items) > self.size:
                self._items.popitem(last=False)
        return value

    def clear(self) -> None:
        with self._lock:
            self._items.clear()
