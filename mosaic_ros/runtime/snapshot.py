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
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import load as load_tensors
from safetensors.torch import save as save_tensors

from mosaic_ros.runtime.kv.policy import TokenMeta

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

    def _check_size(self, entry: dict[str, Any], size: int) -> None:
        if size != entry["bytes"]:
            raise SnapshotTorn(
                f"snapshot segment {entry['file']} is {size} bytes, the manifest says {entry['bytes']} "
                "(truncated or torn)"
            )

    def verify_segment(self, entry: dict[str, Any]) -> None:
        """Check one segment's size and sha256 reading it in blocks (``SnapshotTorn`` otherwise)."""
        path = self.path / entry["file"]
        digest = hashlib.sha256()
        try:
            self._check_size(entry, path.stat().st_size)
            with open(path, "rb") as f:
                while block := f.read(1 << 24):
                    digest.update(block)
        except OSError as error:
            raise SnapshotTorn(f"snapshot segment {entry['file']} is missing: {error}") from error
        if digest.hexdigest() != entry["sha256"]:
            raise SnapshotTorn(f"snapshot segment {entry['file']} fails its sha256 checksum (torn)")

    def read_segment(self, entry: dict[str, Any]) -> dict[str, torch.Tensor]:
        """Tensors of one segment after checking its size and sha256 (``SnapshotTorn`` otherwise)."""
        try:
            data = (self.path / entry["file"]).read_bytes()
        except OSError as error:
            raise SnapshotTorn(f"snapshot segment {entry['file']} is missing: {error}") from error
        self._check_size(entry, len(data))
        if hashlib.sha256(data).hexdigest() != entry["sha256"]:
            raise SnapshotTorn(f"snapshot segment {entry['file']} fails its sha256 checksum (torn)")
        return load_tensors(data)

    def newest_complete(self, identity: dict[str, Any]) -> tuple[int, dict[str, Any], list[str]]:
        """The newest snapshot whose files are all complete (sizes and checksums verified):
        (seq, manifest, messages of the newer torn ones it skipped). Raises ``SnapshotError``
        when there is none at all, ``SnapshotTorn`` when none is complete, and
        ``SnapshotIncompatible`` when it was made with another ``identity``."""
        refused: list[str] = []
        seqs = self.seqs()
        if not seqs:
            raise SnapshotError(f"no snapshot in {self.path}")
        for seq in seqs:
            try:
                manifest = self.read_manifest(seq)
                for entry in manifest["segments"]:
                    self.verify_segment(entry)
            except SnapshotTorn as error:
                refused.append(f"snapshot {seq} refused: {error}")
                continue
            check_identity(manifest["identity"], identity, str(self.path))
            return seq, manifest, refused
        raise SnapshotTorn(f"no complete snapshot in {self.path}: {'; '.join(refused)}")


# ---------------------------------------------------------------------------- one stream


@dataclass
class Lineage:
    """What of a stream is on disk in ``directory``: the base of its next incremental snapshot.

    ``ids``: (L,) int64, the policy's current id of each token the lineage's segments hold, in
    order, -1 once evicted; ``chunks_saved``: how many of the stream's chunks are on disk;
    ``evicted``: lineage tokens evicted so far; ``state``: the stream state last written.
    """

    directory: str
    seq: int
    segments: list[dict[str, Any]]
    ids: torch.Tensor
    chunks_saved: int
    evicted: int
    state: dict[str, Any]


@dataclass
class Capture:
    """One snapshot copied out of a policy, to be written by ``write`` (without the stream's lock)."""

    tensors: dict[str, torch.Tensor]
    manifest: dict[str, Any]
    lineage: Lineage
    tokens: int


def capture(
    policy: Any,
    chunks: list[tuple[int, int]],
    state: dict[str, Any],
    identity: dict[str, Any],
    directory: str,
    base: Lineage | None,
) -> Capture | None:
    """What the next snapshot of a stream adds (the caller holds the stream's lock).

    ``chunks``: (first token id, tokens) of every chunk the stream stored, in order; ``state``:
    the JSON-able stream state to restore; ``base``: the lineage of the last snapshot (None, or
    one in another directory, or one whose tokens on disk are mostly evicted: a full snapshot
    with a new lineage). The new chunks' live tokens are copied out (``export_tokens``) with
    the lineage indices of tokens evicted since ``base``. None when nothing changed since it.
    Raises ``SnapshotError`` when the policy cannot export its memory.
    """
    try:
        live = policy.live_token_ids()
    except (ValueError, NotImplementedError) as error:
        raise SnapshotError(f"cannot snapshot this stream: {error}") from error
    unchanged_base = base
    if base is None or base.directory != directory or base.evicted > live.numel():
        seq = max(SnapshotDir(directory).seqs(), default=0)
        base = Lineage(directory, seq, [], torch.zeros(0, dtype=torch.int64), 0, 0, {})
    evicted = torch.nonzero((base.ids >= 0) & ~torch.isin(base.ids, live)).flatten()
    new_chunks = chunks[base.chunks_saved :]
    if base is unchanged_base and not new_chunks and evicted.numel() == 0 and state == base.state:
        return None
    kept = []
    for start, n in new_chunks:
        ids = torch.arange(start, start + n)
        kept.append(ids[torch.isin(ids, live)])
    new_ids = torch.cat(kept) if kept else torch.zeros(0, dtype=torch.int64)
    out = policy.export_tokens(new_ids)
    tensors = {
        "positions": out.meta.positions,
        "stamps": out.meta.stamps,
        "modality": out.meta.modality,
        "frame": out.meta.frame,
        "chunk_tokens": torch.tensor([k.numel() for k in kept], dtype=torch.int64),
        "evicted": evicted,
    }
    tensors.update({f"kv.{layer}": kv for layer, kv in enumerate(out.kv)})
    ids = base.ids.clone()
    ids[evicted] = -1
    manifest = {
        "format": FORMAT_VERSION,
        "written_at": time.time(),
        "identity": identity,
        "state": state,
        "segments": base.segments,
    }
    lineage = Lineage(
        directory=directory,
        seq=base.seq + 1,
        segments=base.segments,
        ids=torch.cat((ids, new_ids)),
        chunks_saved=len(chunks),
        evicted=base.evicted + evicted.numel(),
        state=state,
    )
    return Capture(tensors, manifest, lineage, int(live.numel()))


def write(cap: Capture) -> tuple[int, int]:
    """Write a captured snapshot crash-safe; returns (bytes written, bytes of the whole snapshot)
    and completes ``cap.lineage`` (its segments) for the next one. ``SnapshotError`` on an
    ``OSError``."""
    where = cap.lineage.directory
    try:
        segments, written, total = SnapshotDir(where).write(cap.lineage.seq, cap.tensors, cap.manifest)
    except OSError as error:
        raise SnapshotError(f"cannot write a snapshot in {where}: {error}") from error
    cap.lineage.segments = segments
    return written, total


def replay(
    snapshots: SnapshotDir,
    manifest: dict[str, Any],
    store: Callable[[TokenMeta, list[torch.Tensor]], torch.Tensor],
    maintain: Callable[[], object],
) -> tuple[torch.Tensor, list[tuple[int, int]]]:
    """Put a snapshot's live tokens back chunk by chunk, one segment in memory at a time:
    ``store(meta, kv)`` stores a chunk (kv: per layer (T, 2, H_kv, D)) and returns its token ids
    (T,), ``maintain()`` runs after each chunk. Returns (the lineage's token ids (L,) int64 in
    the new policy, -1 for evicted ones; (first id, tokens) of every chunk stored)."""
    segments = manifest["segments"]
    evicted = []
    for entry in segments:
        with safe_open(snapshots.path / entry["file"], "pt") as f:
            evicted.append(f.get_tensor("evicted"))
    total = sum(int(entry["tokens"]) for entry in segments)
    alive = torch.ones(total, dtype=torch.bool)
    for ids in evicted:
        alive[ids] = False
    lineage_ids = torch.full((total,), -1, dtype=torch.int64)
    chunks: list[tuple[int, int]] = []
    offset = 0
    for entry in segments:
        seg = snapshots.read_segment(entry)
        layers = sum(1 for name in seg if name.startswith("kv."))
        start = 0
        for n in seg["chunk_tokens"].tolist():
            local = torch.nonzero(alive[offset + start : offset + start + n]).flatten() + start
            # a chunk with no evicted token is a slice of the segment: views, no copy
            pick = slice(start, start + n) if local.numel() == n else local
            start += n
            if local.numel() == 0:
                continue
            meta = TokenMeta(
                positions=seg["positions"][:, pick],
                stamps=seg["stamps"][pick],
                modality=seg["modality"][pick],
                frame=seg["frame"][pick],
            )
            ids = store(meta, [seg[f"kv.{layer}"][pick] for layer in range(layers)])
            chunks.append((int(ids[0]), int(ids.numel())))
            lineage_ids[offset + local] = ids
            maintain()
        offset += int(entry["tokens"])
    return lineage_ids, chunks
