"""``PageFiles``: where a ``HostKVStore`` keeps the pages it spilled out of host memory.

One private directory per store under the configured ``disk_dir`` (``kv-XXXXXXXX``), holding
one file per layer: page ``p`` of layer ``l`` lives at byte offset ``p * page_bytes`` of
``layer-LLL.kv``, byte for byte the page's host tensor (rows of (2, H_kv, D) in the KV dtype),
so a run of rows is one contiguous range of the file. Pages never spilled are holes.

I/O is explicit (``os.pwritev`` / ``os.preadv`` straight between the files and tensors' memory,
no ``mmap``): a spilled page takes no memory of the process, and reading rows back costs
exactly the bytes read. The kernel's page cache may still hold copies of recently written or
read file ranges; that memory belongs to the kernel (reclaimable, not the process's resident
memory, not counted in ``host_kv_bytes``), and nothing here relies on it staying.

The directory is removed by ``close`` (the store's ``close``, a policy's ``reset``, garbage
collection, interpreter exit). A process killed with SIGKILL cannot remove it: each
directory holds a ``lock`` file locked (``flock``) while its store lives, and a new store
removes every ``kv-*`` directory whose lock nobody holds.
"""

from __future__ import annotations

import fcntl
import os
import shutil
import tempfile
import weakref

import numpy as np

PREFIX = "kv-"


def _locked_by_nobody(path: str) -> bool:
    """Whether the store directory ``path`` has a lock file that no live store holds."""
    try:
        fd = os.open(os.path.join(path, "lock"), os.O_RDWR)
    except OSError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        return False
    finally:
        os.close(fd)  # closing drops a lock taken here: the directory is removed next
    return True


def remove_stale(root: str) -> list[str]:
    """Remove the store directories under ``root`` left by dead processes; returns their names."""
    removed = []
    for name in sorted(os.listdir(root)):
        path = os.path.join(root, name)
        if name.startswith(PREFIX) and os.path.isdir(path) and _locked_by_nobody(path):
            shutil.rmtree(path, ignore_errors=True)
            removed.append(name)
    return removed


def check_disk_dir(root: str) -> None:
    """``ValueError`` saying what is wrong unless ``root`` is an existing, writable directory."""
    if not os.path.exists(root):
        raise ValueError(
            f"disk_dir {root!r} does not exist: create it, or turn the disk tier off (disk cap 0)"
        )
    if not os.path.isdir(root):
        raise ValueError(f"disk_dir {root!r} is not a directory")
    try:
        with tempfile.TemporaryFile(dir=root):
            pass
    except OSError as error:
        raise ValueError(f"disk_dir {root!r} is not writable: {error.strerror or error}") from None


def _close(fds: list[int], lock_fd: int, path: str) -> None:
    for fd in fds:
        os.close(fd)
    shutil.rmtree(path, ignore_errors=True)
    os.close(lock_fd)


class PageFiles:
    """Per-layer page files of one store under ``root`` (see the module docstring).

    ``page_bytes``: bytes of one page. Counters since creation: ``bytes_written``, ``bytes_read``.
    """

    def __init__(self, root: str, num_layers: int, page_bytes: int):
        check_disk_dir(root)
        remove_stale(root)
        staging = tempfile.mkdtemp(prefix=".new-" + PREFIX, dir=root)
        lock_fd = os.open(os.path.join(staging, "lock"), os.O_RDWR | os.O_CREAT, 0o600)
        fcntl.flock(lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        # locked before it gets the name other stores look for, so none can take it for stale
        self.path = os.path.join(root, os.path.basename(staging)[len(".new-") :])
        os.rename(staging, self.path)
        self.page_bytes = page_bytes
        self._fds = [
            os.open(os.path.join(self.path, f"layer-{layer:03d}.kv"), os.O_RDWR | os.O_CREAT, 0o600)
            for layer in range(num_layers)
        ]
        self.bytes_written = 0
        self.bytes_read = 0
        self._finalizer = weakref.finalize(self, _close, self._fds, lock_fd, self.path)

    @property
    def closed(self) -> bool:
        return not self._finalizer.alive

    def close(self) -> None:
        """Close the files and remove the directory (idempotent)."""
        self._finalizer()

    def write_page(self, layer: int, page: int, data: np.ndarray) -> None:
        """Write page ``page`` of ``layer`` from ``data`` (``page_bytes`` bytes, C-contiguous)."""
        view = memoryview(data.reshape(-1).view(np.uint8))
        if view.nbytes != self.page_bytes:
            raise ValueError(f"a page is {self.page_bytes} B, got {view.nbytes}")
        offset, done = page * self.page_bytes, 0
        while done < view.nbytes:
            done += os.pwritev(self._fds[layer], [view[done:]], offset + done)
        self.bytes_written += view.nbytes

    def read(self, layer: int, offset: int, out: np.ndarray) -> None:
        """Fill ``out`` (C-contiguous) with the bytes of ``layer``'s file from byte ``offset``."""
        view = memoryview(out.reshape(-1).view(np.uint8))
        done = 0
        while done < view.nbytes:
            got = os.preadv(self._fds[layer], [view[done:]], offset + done)
            if got == 0:
                raise OSError(f"{self.path}: layer {layer} file ends at byte {offset + done}")
            done += got
        self.bytes_read += view.nbytes

    def truncate(self, layer: int, pages: int) -> None:
        """Drop what ``layer``'s file holds beyond its first ``pages`` pages."""
        os.ftruncate(self._fds[layer], pages * self.page_bytes)
