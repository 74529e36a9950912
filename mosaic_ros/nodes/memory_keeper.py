"""Each camera stream's memory on disk, without rclpy: restored at start, snapshotted
periodically and at a clean shutdown, off the frame path.

One directory per camera under ``memory_dir``, named by its camera id (a node parameter,
checked by ``check_camera_id``; nothing from a request ever names a path). ``StreamSession.save``
holds the session's lock, the one ingest and questions hold while they use the model, only while
it copies the KV added since the last snapshot; the files are written after it lets go, on the
keeper's own thread, so a frame waits at most for that copy.
"""

from __future__ import annotations

import re
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from mosaic_ros.nodes.camera_stream import CameraStream
from mosaic_ros.runtime.snapshot import SnapshotDir, SnapshotError, SnapshotInfo, SnapshotTorn

_CAMERA_DIR = re.compile(r"^[A-Za-z0-9_-][A-Za-z0-9_.-]*$")
DISK_TIER_DIR = ".disk"  # under memory_dir: the disk tier's files when disk_dir is not given


def check_camera_id(camera_id: str) -> str | None:
    """Why ``camera_id`` cannot name a snapshot directory, or None when it can (a name starting
    with '.' is refused: those are the node's own, e.g. ``DISK_TIER_DIR``)."""
    if not _CAMERA_DIR.match(camera_id):
        return (
            f"camera_id {camera_id!r} cannot name a snapshot directory under memory_dir "
            "(letters, digits, '_', '.', '-' only, not starting with '.')"
        )
    return None


def disk_tier_dir(memory_dir: str) -> str:
    """The disk tier's directory under ``memory_dir`` (``DISK_TIER_DIR``), created if missing;
    ``OSError`` when it cannot be."""
    path = Path(memory_dir) / DISK_TIER_DIR
    path.mkdir(parents=True, exist_ok=True)
    return str(path)


@dataclass
class SnapshotState:
    """The last snapshot of one stream: its age (s, -1 when there is none), its size on disk
    (bytes) and the last save's error ('' when it worked)."""

    age_s: float
    snapshot_bytes: int
    error: str


class MemoryKeeper:
    """Snapshots of ``streams`` in ``memory_dir``; every ``period_s`` seconds (0: only on
    ``close`` and on request). ``log`` has the rclpy logger's ``info``/``warning``/``error``."""

    def __init__(self, streams: dict[str, CameraStream], memory_dir: str, period_s: float, log):
        self.streams = streams
        self.root = Path(memory_dir)
        self.period_s = period_s
        self._log = log
        self._lock = threading.Lock()
        self._last: dict[str, SnapshotInfo] = {}
        self._errors: dict[str, str] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="memory-snapshots", daemon=True)

    def directory(self, camera_id: str) -> Path:
        return self.root / camera_id

    # ---- start -------------------------------------------------------------------------

    def restore(self) -> None:
        """Load each stream's newest complete snapshot, if it has one (before frames flow)."""
        for camera_id, stream in self.streams.items():
            where = self.directory(camera_id)
            if not SnapshotDir(where).seqs():
                continue
            try:
                info = stream.session.load(where)
            except SnapshotTorn as error:
                self._log.warning(f"camera '{camera_id}': {error}; starting with an empty memory")
                continue
            except SnapshotError as error:  # incompatible, none at all, or a failed replay
                self._log.warning(
                    f"camera '{camera_id}': not restoring the memory in {where}: {error}; starting with "
                    "an empty memory (the next snapshot replaces it)"
                )
                continue
            for message in info.refused:
                self._log.warning(f"camera '{camera_id}': {message}")
            stream.continue_from(stream.session.last_stamp)
            with self._lock:
                self._last[camera_id] = stream.session.last_snapshot
            status = stream.session.status()
            self._log.info(
                f"camera '{camera_id}': restored {info.tokens} tokens ({info.frames} frames, "
                f"{status.stream_seconds:.1f} s of video) from snapshot {info.seq} in {where}, "
                f"{info.ms:.0f} ms"
            )

    def start(self) -> None:
        if self.period_s > 0:
            self._thread.start()

    # ---- snapshots ---------------------------------------------------------------------

    def _run(self) -> None:
        while not self._stop.wait(self.period_s):
            self.save_all()

    def save_all(self) -> tuple[bool, str]:
        """Snapshot every stream now: (all saved, a one-line report). A failure is logged, kept
        for the status and does not stop the other streams."""
        parts, ok = [], True
        for camera_id, stream in self.streams.items():
            try:
                info = stream.session.save(self.directory(camera_id))
            except SnapshotError as error:
                ok = False
                with self._lock:
                    self._errors[camera_id] = str(error)
                self._log.error(f"camera '{camera_id}': snapshot failed: {error}")
                parts.append(f"camera '{camera_id}': {error}")
                continue
            with self._lock:
                self._last[camera_id] = info
                self._errors[camera_id] = ""
            parts.append(f"{camera_id}: {info.tokens} tokens, {info.snapshot_bytes} B")
        count = len(self.streams)
        head = f"saved {count} stream{'s' if count != 1 else ''}" if ok else "snapshot failed"
        return ok, f"{head}: {'; '.join(parts)}"

    def state(self, camera_id: str) -> SnapshotState:
        with self._lock:
            info, error = self._last.get(camera_id), self._errors.get(camera_id, "")
        if info is None:
            return SnapshotState(-1.0, 0, error)
        return SnapshotState(max(time.time() - info.wall_time, 0.0), info.snapshot_bytes, error)

    def close(self) -> None:
        """Stop the periodic snapshots and take the last one (call once the ingest workers stopped)."""
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join()
        ok, report = self.save_all()
        if ok:
            self._log.info(f"memory snapshot at shutdown: {report}")
