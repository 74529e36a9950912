"""``StreamSession``: one video stream's memory in a vision-language model, and questions about it.

Concurrency contract
--------------------
``ingest`` and ``ask`` may be called from different threads (and ``status`` from any).
Frame validation and the vision tower run outside the session lock; the language model
and the KV policy are used under one lock, so an ingest step and a question never
interleave inside the model. A question holds the lock from its prefill to its last
token: frames that arrive meanwhile wait in ``ingest`` (a caller that must not block, like
the ROS node, keeps only the latest frame per camera and counts what it drops).
``reset`` takes the lock too. ``save`` holds the lock only while it copies what is new since
the last snapshot, and writes the files after releasing it. Errors in one call (a bad frame, a
bad question) raise a clear exception (``SessionError``) and leave the session usable. An
unexpected failure inside the model or the KV policy while the stream's memory is being
written (it may have left some layers updated and others not) resets the stream and raises
``StreamFault``: the session stays usable, with an empty memory.
"""

from __future__ import annotations

import math
import os
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from mosaic_ros.runtime.config import check, check_options, internal, nested, setting, strict
from mosaic_ros.runtime.kv.bridge import ATTENTION_NAME, KVBridge
from mosaic_ros.runtime.kv.policy import KVGeometry, PolicyConfig, TokenMeta, known_policies, make_policy
from mosaic_ros.runtime.models.base import PositionCursor
from mosaic_ros.runtime.models.preprocess import validate_frames
from mosaic_ros.runtime.snapshot import (
    Lineage,
    RestoreInfo,
    SnapshotDir,
    SnapshotError,
    SnapshotInfo,
    capture,
    identity_of,
    replay,
    write,
)
from mosaic_ros.runtime.stats import Answer, LatencyStats


class SessionError(ValueError):
    """A request the session cannot serve; the message says why. The session stays usable."""


class QuestionError(SessionError):
    """The question is empty, too long, or asked before any frame."""


class StampError(SessionError):
    """A frame's timestamp is not a finite number >= 0, or goes backwards."""


class StreamFault(RuntimeError):
    """Writing to the stream's memory failed inside the model or the KV policy; the stream was
    reset (its memory is empty) so that it stays consistent. The message says what failed."""


@dataclass(frozen=True)
class TimeWindow:
    """Only video between ``start`` and ``end`` (stream seconds, inclusive) may be retrieved."""

    start: float
    end: float

    def __post_init__(self) -> None:
        if not (math.isfinite(self.start) and math.isfinite(self.end)) or self.end < self.start:
            raise SessionError(f"invalid time window [{self.start}, {self.end}]")

    @classmethod
    def last(cls, seconds: float, now: float) -> TimeWindow:
        """The last ``seconds`` of video up to ``now``."""
        if not seconds > 0:
            raise SessionError(f"window length must be > 0 s, got {seconds}")
        return cls(now - seconds, now)


@strict
@dataclass
class SessionConfig:
    """How a stream is remembered and questioned (the root of the runtime's configuration tree,
    ``runtime.config``: its settings are the node's parameters and the command lines' flags).

    ``kv`` is the policy's configuration; its ``sink_tokens`` unset makes the stream's fixed
    preamble the attention sinks, and its ``options`` must be options of ``policy``.
    ``kv_dtype=None`` stores KV in the model's dtype. ``maintain_budget_ms`` bounds deferred KV
    maintenance after each frame. ``remember_dialogue`` appends each question and its answer to
    the stream as text, so later questions can refer to them. A question is refused beyond
    ``max_question_chars`` characters or ``max_question_tokens`` tokens (the model's prefill cost
    grows with tokens, and some characters are several tokens each); a text event (``add_text``)
    beyond ``max_text_tokens`` tokens. The ``live`` settings may change while the session runs.
    """

    policy: str = setting(
        "dense",
        "KV policy: how the stream's KV is kept and what of it a question retrieves.",
        choices=known_policies,
        what="KV policy",
    )
    kv: PolicyConfig = nested(PolicyConfig)
    kv_dtype: torch.dtype | None = internal(None)
    maintain_budget_ms: float = setting(
        5.0,
        "Time per frame for deferred KV maintenance (cluster splits and sealing); work that does "
        "not fit is done later, or on the frame's path once it is overdue.",
        unit="ms",
        low=0.0,
        high=10000.0,
        flags=("--maintain-ms",),
    )
    max_question_chars: int = setting(
        2000, "Longest question accepted.", unit="characters", low=1, high=100000, live=True
    )
    max_question_tokens: int = setting(
        512,
        "Longest question accepted, in tokens of the model's tokenizer (its prefill holds the model).",
        unit="tokens",
        low=1,
        high=100000,
        live=True,
    )
    max_text_tokens: int = setting(
        512,
        "Longest text event accepted; longer ones are dropped with a warning.",
        unit="tokens",
        low=1,
        high=100000,
        live=True,
    )
    max_new_tokens: int = setting(
        64, "Answer length when a question gives none.", unit="tokens", low=1, high=4096, live=True
    )
    remember_dialogue: bool = setting(
        True, "Each question and its answer join the stream's memory, so later questions can refer to them."
    )

    def __post_init__(self) -> None:
        check(self)
        check_options(self.policy, self.kv.options)


@dataclass
class IngestResult:
    """What one frame cost (ms) and added; ``held``: the frame waits for the rest of its chunk."""

    tokens: int
    vision_encode_ms: float
    prefill_ms: float
    maintain_ms: float
    held: bool = False


@dataclass
class SessionStatus:
    """The stream's memory now."""

    policy: str
    frames_ingested: int
    tokens_in_memory: int
    host_kv_bytes: int
    device_kv_bytes: int
    clusters_in_memory: int
    tokens_evicted: int
    first_stamp: float | None
    last_stamp: float | None
    ingest_ms_mean: float
    texts_ingested: int = 0
    disk_kv_bytes: int = 0

    @property
    def stream_seconds(self) -> float:
        if self.first_stamp is None or self.last_stamp is None:
            return 0.0
        return self.last_stamp - self.first_stamp


TokenCallback = Callable[[str, int], "bool | None"]


class StreamSession:
    """Ingests frames with timestamps and answers questions about everything seen so far."""

    def __init__(self, adapter, config: SessionConfig | None = None):
        self.adapter = adapter
        self.config = config or SessionConfig()
        adapter.set_attention(ATTENTION_NAME)
        self._lock = threading.RLock()
        self._save_lock = threading.Lock()  # one save at a time (its file writes run outside _lock)
        self._generation = 0  # bumped whenever the stream starts over
        self._last_snapshot: SnapshotInfo | None = None
        self._build()

    # ---- setup -------------------------------------------------------------------------

    def _build(self) -> None:
        cfg, ad = self.config, self.adapter
        preamble = ad.system_chunk(PositionCursor())
        sinks = preamble.n_tokens if cfg.kv.sink_tokens is None else cfg.kv.sink_tokens
        geometry = KVGeometry(
            num_layers=ad.num_layers,
            num_kv_heads=ad.num_kv_heads,
            head_dim=ad.head_dim,
            num_q_heads=ad.num_heads,
            position_dims=ad.position_dims,
            dtype=cfg.kv_dtype or ad.dtype,
        )
        policy_config = replace(cfg.kv, sink_tokens=sinks)
        self.policy = make_policy(cfg.policy, geometry, policy_config, ad.device)
        self.bridge = KVBridge(self.policy, ad.rotary, ad.num_layers)
        self._identity = identity_of(ad, self.policy)
        self._start_stream()

    def _clear_state(self) -> None:
        """Session counters of an empty stream; the next snapshot starts a new lineage."""
        self._cursor = PositionCursor()
        self._frames = 0
        self._texts = 0
        self._first_stamp: float | None = None
        self._last_stamp: float | None = None
        self._ingest_ms_total = 0.0
        self._evicted_before = 0  # tokens evicted before a restore (the new policy counts from 0)
        self._chunks: list[tuple[int, int]] = []  # (first token id, tokens) per chunk, in order
        self._held: list[tuple[np.ndarray, float]] = []  # frames waiting for their chunk's others
        self._lineage: Lineage | None = None  # what of this stream the last snapshot holds
        self._generation += 1

    def _start_stream(self) -> None:
        """Empty stream: only the fixed preamble (the attention sinks) in memory."""
        self._clear_state()
        self._forward_ingest(self.adapter.system_chunk(self._cursor), stamp=0.0)

    @property
    def rotary(self):
        return self.adapter.rotary

    # ---- stream ------------------------------------------------------------------------

    def ingest(self, frame: np.ndarray, stamp: float, channel_order: str = "rgb") -> IngestResult:
        """Add one frame (H, W, 3) uint8 seen at ``stamp`` seconds; returns its cost.

        With an adapter of ``frames_per_chunk`` 2 (Qwen-VL with paired frames) a frame is held
        until the next one completes its pair (``IngestResult.held``, no tokens yet); the pair
        is then one chunk at the adapter's ``chunk_stamp`` (the midpoint). A held frame is not
        in memory: questions, snapshots and ``reset`` do not see (``reset`` drops) it.

        Raises ``FrameError`` (bad array), ``StampError`` (negative, non-finite or backwards
        stamp) or ``StreamFault`` (the model or policy failed; the stream was reset).
        """
        t0 = time.perf_counter()
        stamp = float(stamp)
        if not (math.isfinite(stamp) and stamp >= 0.0):
            raise StampError(f"frame stamp must be a finite number of seconds >= 0, got {stamp}")
        if channel_order not in ("rgb", "bgr"):
            raise SessionError(f"channel_order must be 'rgb' or 'bgr', got {channel_order!r}")
        rgb = frame if channel_order == "rgb" else _bgr_to_rgb(frame)
        if self.adapter.frames_per_chunk > 1:  # a held frame is checked now, not when its pair is
            validate_frames([rgb])
        with self._lock:
            newest = self._held[-1][1] if self._held else self._last_stamp
            if newest is not None and stamp < newest:
                raise StampError(
                    f"frame stamp {stamp:.3f} s is older than the last one ({newest:.3f} s); "
                    "reset the stream after a time jump"
                )
            self._held.append((rgb, stamp))
            if len(self._held) < self.adapter.frames_per_chunk:
                return IngestResult(0, 0.0, 0.0, 0.0, held=True)
            frames, stamps = zip(*self._held, strict=True)
            self._held = []
        batch = self.adapter.prepare_frames(list(frames))
        features = self.adapter.encode_frames(batch)
        vision_ms = (time.perf_counter() - t0) * 1e3
        stamp = self.adapter.chunk_stamp(list(stamps))
        with self._lock:
            t1 = time.perf_counter()
            with self._resets_on_fault("ingesting a frame"):
                chunk = self.adapter.frame_chunk(features, stamp, self._cursor)
                self._forward_ingest(chunk, stamp)
                prefill_ms = (time.perf_counter() - t1) * 1e3
                self._frames += len(frames)
                self._first_stamp = stamp if self._first_stamp is None else self._first_stamp
                self._last_stamp = stamp
                maintain_ms = self.policy.maintain(self.config.maintain_budget_ms)
            self._ingest_ms_total += vision_ms + prefill_ms + maintain_ms
        return IngestResult(chunk.n_tokens, vision_ms, prefill_ms, maintain_ms)

    @contextmanager
    def _resets_on_fault(self, doing: str) -> Iterator[None]:
        """Turn an unexpected failure while writing the memory into a reset and a ``StreamFault``
        (caller holds the lock)."""
        try:
            yield
        except SessionError:
            raise
        except Exception as error:
            self.bridge.reset()
            self._start_stream()
            raise StreamFault(
                f"{type(error).__name__} while {doing}: {error}; the stream's memory was reset"
            ) from error

    def add_text(self, text: str, stamp: float) -> IngestResult:
        """Add a text event seen at ``stamp`` s (a speech transcript line, an operator's note):
        its time marker and text join the stream's memory as text tokens, between the frames,
        where retrieval finds them like any other token (they may share clusters with frames).

        Raises ``SessionError`` for empty text, text over ``max_text_tokens`` tokens or a
        negative or non-finite stamp, ``StreamFault`` if the model or policy failed (the
        stream was reset). Text stamps are not checked against frame stamps: they may come
        from another clock (the node stamps text at receipt).
        """
        if not isinstance(text, str) or not text.strip():
            raise SessionError("text event is empty")
        stamp = float(stamp)
        if not (math.isfinite(stamp) and stamp >= 0.0):
            raise StampError(f"text stamp must be a finite number of seconds >= 0, got {stamp}")
        text = " ".join(text.split())  # one line: newlines end the event in the prompt
        tokens, limit = len(self.adapter.encode_text(text)), self.config.max_text_tokens
        if tokens > limit:
            raise SessionError(f"text event is {tokens} tokens long; the limit is {limit}")
        with self._lock:
            t0 = time.perf_counter()
            with self._resets_on_fault("adding a text event"):
                chunk = self.adapter.text_event_chunk(text, stamp, self._cursor)
                self._forward_ingest(chunk, stamp)
                prefill_ms = (time.perf_counter() - t0) * 1e3
                self._texts += 1
                maintain_ms = self.policy.maintain(self.config.maintain_budget_ms)
        return IngestResult(chunk.n_tokens, 0.0, prefill_ms, maintain_ms)

    def _forward_ingest(self, chunk, stamp: float) -> None:
        """Run one chunk through the model and into the policy's store (caller holds the lock)."""
        n = chunk.n_tokens
        modality = torch.as_tensor(chunk.modality, dtype=torch.uint8).reshape(n)
        frame = torch.full((n,), -1, dtype=torch.int64)
        frame[modality.bool()] = self._frames
        meta = TokenMeta(
            positions=chunk.token_positions.detach().cpu().to(torch.int64),
            stamps=torch.full((n,), stamp, dtype=torch.float64),
            modality=modality,
            frame=frame,
        )
        token_ids = self.policy.add_tokens(meta)
        with torch.no_grad(), self.bridge.ingest_step(chunk.token_positions, token_ids) as cache:
            self.adapter.forward(chunk, cache)
        self._cursor = chunk.cursor
        self._chunks.append((int(token_ids[0]), n))

    # ---- questions ---------------------------------------------------------------------

    def ask(
        self,
        question: str,
        window: TimeWindow | None = None,
        max_new_tokens: int | None = None,
        on_token: TokenCallback | None = None,
        cancel: threading.Event | None = None,
    ) -> Answer:
        """Answer ``question`` about the video so far (greedy decoding).

        ``on_token(piece, token_id)`` is called per generated token with the new text;
        returning False stops generation, as does setting ``cancel``. Raises
        ``QuestionError`` for an empty or too long question or one asked before any frame,
        ``StreamFault`` when keeping the dialogue in memory failed (the stream was reset).
        ``stats.total_ms`` covers the whole call; ``stats.prefill_ms`` the question's prefill
        plus, with ``remember_dialogue``, writing the question and answer into memory.
        """
        t_call = time.perf_counter()
        question = self.check_question(question)
        limit = self.config.max_new_tokens if max_new_tokens is None else int(max_new_tokens)
        if limit <= 0:
            raise QuestionError(f"max_new_tokens must be > 0, got {limit}")
        with self._lock:
            t_start = time.perf_counter()
            if self._frames == 0:
                raise QuestionError("no frame has been ingested yet; ask again once the camera streams")
            answer = self._answer_locked(question, window, limit, on_token, cancel, t_call, t_start)
            if self.config.remember_dialogue and answer.text:
                t_remember = time.perf_counter()
                with self._resets_on_fault("keeping the dialogue in memory"):
                    self._remember(question, answer.text)
                answer.stats.prefill_ms += (time.perf_counter() - t_remember) * 1e3
                self._fill_memory(answer.stats)
        answer.stats.total_ms = (time.perf_counter() - t_call) * 1e3
        return answer

    def question_queries(self, question: str) -> list[torch.Tensor]:
        """Pre-RoPE queries (H_q, L_q, D) per layer of the question's prefill (for benchmarks)."""
        question = self.check_question(question)
        with self._lock, torch.no_grad():
            chunk = self.adapter.question_chunk(question, self._cursor)
            self.bridge.begin_question(None, capture=True)
            try:
                with self.bridge.question_step(chunk.token_positions) as cache:
                    self.adapter.forward(chunk, cache)
                return [q.clone() for q in self.bridge.captured_queries]
            finally:
                self.bridge.end_question()

    def check_question(self, question: str) -> str:
        """The question as it will be asked (stripped); ``QuestionError`` if it is empty or
        longer than ``max_question_chars`` characters or ``max_question_tokens`` tokens."""
        if not isinstance(question, str) or not question.strip():
            raise QuestionError("question is empty")
        if len(question) > self.config.max_question_chars:
            raise QuestionError(
                f"question has {len(question)} characters; the limit is {self.config.max_question_chars}"
            )
        question = question.strip()
        tokens = len(self.adapter.encode_text(question))
        if tokens > self.config.max_question_tokens:
            raise QuestionError(
                f"question is {tokens} tokens long; the limit is {self.config.max_question_tokens}"
            )
        return question

    def _answer_locked(self, question, window, limit, on_token, cancel, t_call, t_start) -> Answer:
        ad = self.adapter
        stats = LatencyStats(policy=self.config.policy, queue_ms=(t_start - t_call) * 1e3)
        retrieval_window = None if window is None else (window.start, window.end)
        generated: list[int] = []
        text = ""
        cancelled = False
        with torch.no_grad():
            chunk = ad.question_chunk(question, self._cursor)
            self.bridge.begin_question(retrieval_window)
            try:
                with self.bridge.question_step(chunk.token_positions) as cache:
                    logits = ad.forward(chunk, cache)
                t_prefill = time.perf_counter()
                stats.prefill_ms = (t_prefill - t_start) * 1e3
                cursor = chunk.cursor
                eos = set(ad.eos_token_ids)
                for i in range(limit):
                    token = int(torch.argmax(logits[0]))
                    if i == 0:
                        stats.ttft_ms = (time.perf_counter() - t_call) * 1e3
                    if token in eos:
                        break
                    generated.append(token)
                    new_text = ad.tokenizer.decode(generated, skip_special_tokens=True)
                    piece, text = new_text[len(text) :], new_text
                    if on_token is not None and on_token(piece, token) is False:
                        cancelled = True
                        break
                    if cancel is not None and cancel.is_set():
                        cancelled = True
                        break
                    if i + 1 == limit:
                        break
                    step = ad.token_chunk(token, cursor)
                    with self.bridge.question_step(step.token_positions) as cache:
                        logits = ad.forward(step, cache)
                    cursor = step.cursor
                stats.decode_ms = (time.perf_counter() - t_prefill) * 1e3
            finally:
                retrieval = self.bridge.end_question()
        stats.tokens_generated = len(generated)
        stats.retrieval_ms = retrieval.select_ms
        stats.transfer_ms = retrieval.transfer_ms
        stats.copy_device_ms = retrieval.copy_device_ms
        stats.disk_fetch_ms = retrieval.disk_fetch_ms
        stats.disk_bytes_read = retrieval.disk_bytes_read
        stats.tokens_retrieved = retrieval.tokens_retrieved
        stats.bytes_moved = retrieval.bytes_moved
        stats.copies = retrieval.copies
        stats.prefetch_hit_rate = retrieval.prefetch_hit_rate
        self._fill_memory(stats)
        return Answer(text=text.strip(), stats=stats, cancelled=cancelled)

    def _remember(self, question: str, answer: str) -> None:
        stamp = self._last_stamp or 0.0
        self._forward_ingest(self.adapter.question_chunk(question, self._cursor), stamp)
        self._forward_ingest(self.adapter.resume_chunk(answer, self._cursor), stamp)

    def _fill_memory(self, stats: LatencyStats) -> None:
        mem = self.policy.memory()
        stats.frames_in_memory = self._frames
        stats.tokens_in_memory = mem.tokens
        stats.device_kv_bytes = mem.device_kv_bytes_peak
        stats.host_kv_bytes = mem.host_kv_bytes
        stats.disk_kv_bytes = mem.disk_kv_bytes
        stats.clusters_in_memory = mem.units
        stats.tokens_evicted = mem.tokens_evicted + self._evicted_before

    # ---- housekeeping ------------------------------------------------------------------

    def status(self) -> SessionStatus:
        with self._lock:
            mem = self.policy.memory()
            return SessionStatus(
                policy=self.config.policy,
                frames_ingested=self._frames,
                texts_ingested=self._texts,
                tokens_in_memory=mem.tokens,
                host_kv_bytes=mem.host_kv_bytes,
                device_kv_bytes=mem.device_kv_bytes,
                disk_kv_bytes=mem.disk_kv_bytes,
                clusters_in_memory=mem.units,
                tokens_evicted=mem.tokens_evicted + self._evicted_before,
                first_stamp=self._first_stamp,
                last_stamp=self._last_stamp,
                ingest_ms_mean=self._ingest_ms_total / self._frames if self._frames else 0.0,
            )

    @property
    def first_stamp(self) -> float | None:
        """Stamp (s) of the oldest frame since the stream started; None before any. No lock."""
        return self._first_stamp

    @property
    def last_stamp(self) -> float | None:
        """Stamp (s) of the newest frame; None before any. Read without the lock (a question
        in progress does not delay it)."""
        return self._last_stamp

    def reset(self) -> None:
        """Forget the whole stream (the model stays loaded); the next ``save`` writes an empty one."""
        with self._lock:
            self.bridge.reset()
            self._start_stream()

    # ---- snapshots ---------------------------------------------------------------------

    @property
    def last_snapshot(self) -> SnapshotInfo | None:
        """The last snapshot this session wrote or loaded (None before any)."""
        return self._last_snapshot

    def save(self, directory: str | os.PathLike) -> SnapshotInfo:
        """Snapshot the stream's live tokens into ``directory`` (see ``runtime.snapshot``), crash-safe.

        Incremental: writes only the chunks ingested since this session's last snapshot into the
        same directory, plus the ids of tokens evicted since (a first save, a save after
        ``reset`` or a save where most tokens on disk were evicted writes everything). Holds the
        session lock only while copying the new KV (``capture_ms``); ingest and questions go on
        while the files are written (``write_ms``). Nothing new since the last snapshot: nothing
        is written and the last one's info comes back. Raises ``SnapshotError`` when the memory
        cannot be exported (layers holding different tokens, after per-layer compression under
        ``host_cap_bytes``) or the files cannot be written (``OSError`` text in the message).
        """
        directory = str(Path(directory).resolve())
        with self._save_lock:
            t0 = time.perf_counter()
            with self._lock:
                generation, frames = self._generation, self._frames
                cap = capture(
                    self.policy, self._chunks, self._state(), self._identity, directory, self._lineage
                )
            t1 = time.perf_counter()
            if cap is None:
                return self._last_snapshot
            written, total = write(cap)
            with self._lock:
                if self._generation == generation:
                    self._lineage = cap.lineage
            t2 = time.perf_counter()
            self._last_snapshot = SnapshotInfo(
                directory=directory,
                seq=cap.lineage.seq,
                bytes_written=written,
                snapshot_bytes=total,
                tokens=cap.tokens,
                frames=frames,
                capture_ms=(t1 - t0) * 1e3,
                write_ms=(t2 - t1) * 1e3,
                wall_time=cap.manifest["written_at"],
            )
            return self._last_snapshot

    def _state(self) -> dict[str, Any]:
        """The session state a restored stream continues from (JSON-able)."""
        return {
            "cursor": asdict(self._cursor),
            "frames": self._frames,
            "texts": self._texts,
            "first_stamp": self._first_stamp,
            "last_stamp": self._last_stamp,
            "ingest_ms_total": self._ingest_ms_total,
            "tokens_evicted": self.policy.memory().tokens_evicted + self._evicted_before,
            "stored_tokens": self.bridge.stored_tokens,
        }

    def load(self, directory: str | os.PathLike) -> RestoreInfo:
        """Replace the stream with the newest complete snapshot in ``directory``.

        The snapshot's chunks are replayed into a fresh policy through its public interface
        (``add_tokens``, ``append`` per layer, ``maintain``), as ingest stores them but without
        running the model; the session state (positions, counters, stamps) is restored. A newer
        torn snapshot (missing, truncated or failing its checksum) is skipped for the previous one
        (``RestoreInfo.refused`` says which and why). Raises ``SnapshotIncompatible`` (another
        model, KV geometry or policy: the message names what differs; the stream is untouched),
        ``SnapshotTorn`` (no complete snapshot), ``SnapshotError`` (none at all, or the replay
        failed: then the stream is reset, empty). Saving into the same directory afterwards
        continues it incrementally.
        """
        t0 = time.perf_counter()
        directory = str(Path(directory).resolve())
        snapshots = SnapshotDir(directory)
        seq, manifest, refused = snapshots.newest_complete(self._identity)
        budget = self.config.maintain_budget_ms
        with self._lock:
            self.bridge.reset()
            self._clear_state()
            try:
                lineage_ids, self._chunks = replay(
                    snapshots, manifest, self.bridge.replay, lambda: self.policy.maintain(budget)
                )
                state = manifest["state"]
                self._cursor = PositionCursor(**state["cursor"])
                self._frames = int(state["frames"])
                self._texts = int(state["texts"])
                self._first_stamp = state["first_stamp"]
                self._last_stamp = state["last_stamp"]
                self._ingest_ms_total = float(state["ingest_ms_total"])
                self._evicted_before = int(state["tokens_evicted"])
                self.bridge.stored_tokens = int(state["stored_tokens"])
            except Exception as error:
                self.bridge.reset()
                self._start_stream()
                raise SnapshotError(
                    f"replaying snapshot {seq} of {directory} failed ({type(error).__name__}: {error}); "
                    "the stream starts empty"
                ) from error
            self._lineage = Lineage(
                directory=directory,
                seq=seq,
                segments=manifest["segments"],
                ids=lineage_ids,
                chunks_saved=len(self._chunks),
                evicted=int((lineage_ids < 0).sum()),
                state=self._state(),
            )
            tokens = self.policy.memory().tokens
            frames = self._frames
        size = sum(int(e["bytes"]) for e in manifest["segments"])
        self._last_snapshot = SnapshotInfo(
            directory, seq, 0, size, tokens, frames, 0.0, 0.0, float(manifest["written_at"])
        )
        ms = (time.perf_counter() - t0) * 1e3
        return RestoreInfo(directory, seq, len(manifest["segments"]), tokens, frames, ms, refused)


def _bgr_to_rgb(frame: np.ndarray) -> np.ndarray:
    if not isinstance(frame, np.ndarray) or frame.ndim != 3 or frame.shape[2] != 3:
        return frame
    return frame[:, :, ::-1]
