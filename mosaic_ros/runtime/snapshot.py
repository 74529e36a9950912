"""Crash-safe snapshots of a stream's memory in a directory: segments of tensors and manifests.

A snapshot holds the stream's *live* tokens in a replayable form (see ``StreamSession.save``).
On disk, in one directory per stream:

* ``seg-<seq>.safetensors``: what snapshot ``seq`` added: the chunks ingested since the
  previous snapshot of the same lineage (their live tokens' positions (P, n) int64, stamps (n,)
  float64, modality (n,) uint8, frame (n,) int64, live tokens per chunk (c,) int64, and per
  layer ``kv.<layer>`` (n, 2, H_kv, D) pre-RoPE K then V in the KV dtype) and ``evicted`` (e,)
  int64: lineage indices (a token's place in the concatenation of all the lineage's segments)
  of tokens evicted since the previous snapshot.
* ``manifest-<seq>.json``: plain JSON: the format version, the identity (model, KV geometry,
  policy and its config), the session state, and the lineage's segments in order, each with
  its size in bytes and sha256.

Every file is written to a temporary file in the same directory, fsynced, renamed into place
and the directory fsynced, segment first and manifest last, so a crash leaves either the new
snapshot complete or the previous one untouched. The newest two manifests are kept (and the
segments they name); loading verifies sizes and checksums and falls back to the previous
manifest when the newest is torn. No file name comes from a request: names are made here from
sequence numbers only.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load as load_tensors
from safetensors.torch import save as save_tensors

FORMAT_VERSION = 1
KEEP_MANIFESTS = 2
_MANIFEST = re.compile(r"^manifest-(\d{8})\.json$")
_SEGMENT = re.compile(r"^seg-\d{8}\.safetensors$")


class SnapshotError(RuntimeError):
    """A snapshot cannot be written or loaded; the message says why."""


class SnapshotIncompatible(SnapshotError):
    """The snapshot was made with another model, KV geometry or policy; the message names what differs."""


class SnapshotTorn(SnapshotError):
    """A snapshot file is missing, truncated or fails its checksum."""


@dataclass
class SnapshotInfo:
    """What one ``save`` wrote: ``bytes_written`` this time, ``snapshot_bytes`` the whole snapshot
    on disk (segments + manifest), ``tokens`` live tokens in it, ``capture_ms`` the time the
    session's lock was held to copy new KV, ``write_ms`` the time spent writing files after it,
    ``wall_time`` the Unix time (s) it completed."""

    directory: str
    seq: int
    bytes_written: int
    snapshot_bytes: int
    tokens: int
    frames: int
    capture_ms: float
    write_ms: float
    wall_time: float


@dataclass
class RestoreInfo:
    """What ``load`` restored: snapshot ``seq`` (``segments`` files), ``tokens`` and ``frames`` in
    memory after it, ``ms`` the whole load (read, verify, replay); ``refused``: one message per
    newer snapshot that was torn and skipped."""

    directory: str
    seq: int
    segments: int
    tokens: int
    frames: int
    ms: float
    refused: list[str]


def identity_of(adapter: Any, policy: Any) -> dict[str, Any]:
    """What a snapshot must match to be loaded: the model (family, class, config name, dtype,
    frames per chunk and a sha256 of a sample of its embedding table, which tells seeds and
    checkpoints apart), the KV geometry, the policy name and its ``PolicyConfig``."""
    embeddings = adapter.language_model.get_input_embeddings().weight
    sample = torch.cat((embeddings[:4], embeddings[-4:])).detach().to("cpu", torch.float32)
    g = policy.geometry
    c = policy.config
    identity = {
        "model": {
            "family": adapter.family,
            "adapter": type(adapter).__name__,
            "name_or_path": str(getattr(adapter.model.config, "_name_or_path", "")),
            "dtype": str(adapter.dtype),
            "frames_per_chunk": int(getattr(adapter, "frames_per_chunk", 1)),
            "weights_sample_sha256": hashlib.sha256(sample.numpy().tobytes()).hexdigest(),
        },
        "geometry": {
            "num_layers": g.num_layers,
            "num_kv_heads": g.num_kv_heads,
            "head_dim": g.head_dim,
            "num_q_heads": g.num_q_heads,
            "position_dims": g.position_dims,
            "dtype": str(g.dtype),
        },
        "policy": policy.name,
        "policy_config": {
            "budget_tokens": c.budget_tokens,
            "sink_tokens": c.sink_tokens,
            "window_tokens": c.window_tokens,
            "host_cap_bytes": c.host_cap_bytes,
            "compression": c.compression,
            "prefetch": c.prefetch,
            "options": dict(c.options),
        },
    }
    return json.loads(json.dumps(identity))  # the form it has after a round trip through JSON


def identity_differences(saved: dict[str, Any], current: dict[str, Any], prefix: str = "") -> list[str]:
    """Human-readable differences ``key: snapshot X, this session Y`` between two identities."""
    out = []
    for key in sorted(set(saved) | set(current)):
        a, b = saved.get(key), current.get(key)
        name = f"{prefix}{key}"
        if isinstance(a, dict) and isinstance(b, dict):
            out += identity_differences(a, b, name + ".")
        elif a != b:
            out.append(f"{name}: snapshot {a!r}, this session {b!r}")
    return out


def check_identity(saved: dict[str, Any], current: dict[str, Any], where: str) -> None:
    """Raise ``SnapshotIncompatible`` naming every difference."""
    diffs = identity_differences(saved, current)
    if diffs:
        raise SnapshotIncompatible(
            f"snapshot in {where} was made with another model or policy: {'; '.join(diffs)}"
        )


# ---------------------------------------------------------------------------- files


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` crash-safe: temporary file beside it, fsync, rename, fsync the directory."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    _fsync_dir(path.parent)


def _segment_name(seq: int) -> str:
    return f"seg-{seq:08d}.safetensors"


def _manifest_name(seq: int) -> str:
    return f"manifest-{seq:08d}.json"


class SnapshotDir:
    """One stream's snapshot directory (created if missing)."""

    def __init__(self, directory: str | os.PathLike):
        self.path = Path(directory)

    def seqs(self) -> list[int]:
        """Sequence numbers of the manifests present, newest first."""
        if not self.path.is_dir():
            return []
        found = (_MANIFEST.match(p.name) for p in self.path.iterdir())
        return sorted((int(m.group(1)) for m in found if m), reverse=True)

    def write(
        self, seq: int, tensors: dict[str, torch.Tensor], manifest: dict[str, Any]
    ) -> tuple[list[dict[str, Any]], int, int]:
        """Write segment ``seq`` (``tensors``) then manifest ``seq``, whose ``segments`` list gets
        the new segment appended; drop manifests older than the newest ``KEEP_MANIFESTS`` and the
        segments no kept manifest names. Returns (the manifest's segments, bytes written, bytes
        of the whole snapshot)."""
        self.path.mkdir(parents=True, exist_ok=True)
        data = save_tensors({k: v.contiguous() for k, v in tensors.items()})
        atomic_write(self.path / _segment_name(seq), data)
        entry = {
            "file": _segment_name(seq),
            "bytes": len(data),
            "sha256": hashlib.sha256(data).hexdigest(),
            "tokens": int(tensors["stamps"].numel()),
        }
        manifest = {**manifest, "segments": [*manifest["segments"], entry]}
        text = json.dumps(manifest, indent=1).encode()
        atomic_write(self.path / _manifest_name(seq), text)
        self._collect()
        total = sum(int(e["bytes"]) for e in manifest["segments"]) + len(text)
        return manifest["segments"], len(data) + len(text), total

    def _collect(self) -> None:
        seqs = self.seqs()
        keep: set[str] = set()
        for seq in seqs[:KEEP_MANIFESTS]:
            keep.add(_manifest_name(seq))
            try:
                manifest = json.loads((self.path / _manifest_name(seq)).read_text())
                keep.update(entry["file"] for entry in manifest["segments"])
            except (OSError, ValueError, KeyError, TypeError):
                return  # an unreadable kept manifest: remove nothing it might have named
        for p in self.path.iterdir():
            stale = p.name.startswith(".") and ".tmp-" in p.name
            ours = _MANIFEST.match(p.name) or _SEGMENT.match(p.name)
            if stale or (ours and p.name not in keep):
                p.unlink(missing_ok=True)

    def read_manifest(self, seq: int) -> dict[str, Any]:
        """Manifest ``seq`` parsed and checked for shape (``SnapshotTorn`` when it is not)."""
        name = _manifest_name(seq)
        try:
            manifest = json.loads((self.path / name).read_text())
        except (OSError, ValueError) as error:
            raise SnapshotTorn(f"snapshot manifest {name} is unreadable or truncated: {error}") from error
        if not isinstance(manifest, dict) or manifest.get("format") != FORMAT_VERSION:
            raise SnapshotTorn(f"snapshot manifest {name} is not format {FORMAT_VERSION}")
        for key in ("identity", "state", "segments"):
            if key not in manifest:
                raise SnapshotTorn(f"snapshot manifest {name} lacks {key!r}")
        for entry in manifest["segments"]:
            if not _SEGMENT.match(str(entry.get("file"))):
                raise SnapshotTorn(f"snapshot manifest {name} names a segment {entry.get('file')!r}")
        return manifest

    def read_segment(self, entry: dict[str, Any]) -> dict[str, torch.Tensor]:
        """Tensors of one segment after checking its size and sha256 (``SnapshotTorn`` otherwise)."""
        path = self.path / entry["file"]
        try:
            data = path.read_bytes()
        except OSError as error:
            raise SnapshotTorn(f"snapshot segment {entry['file']} is missing: {error}") from error
        if len(data) != entry["bytes"]:
            raise SnapshotTorn(
                f"snapshot segment {entry['file']} is {len(data)} bytes, the manifest says {entry['bytes']} "
                "(truncated or torn)"
            )
        if hashlib.sha256(data).hexdigest() != entry["sha256"]:
            raise SnapshotTorn(f"snapshot segment {entry['file']} fails its sha256 checksum (torn)")
        return load_tensors(data)

    def load_newest(self) -> tuple[int, dict[str, Any], list[dict[str, torch.Tensor]], list[str]]:
        """The newest complete snapshot: (seq, manifest, segments' tensors in order, messages of
        the newer torn ones it skipped). ``SnapshotError`` when none is complete."""
        refused: list[str] = []
        seqs = self.seqs()
        if not seqs:
            raise SnapshotError(f"no snapshot in {self.path}")
        for seq in seqs:
            try:
                manifest = self.read_manifest(seq)
                return seq, manifest, [self.read_segment(e) for e in manifest["segments"]], refused
            except SnapshotTorn as error:
                refused.append(f"snapshot {seq} refused: {error}")
        raise SnapshotTorn(f"no complete snapshot in {self.path}: {'; '.join(refused)}")
