"""One camera's path from a ROS callback into a ``StreamSession``, without rclpy.

The ROS callback calls ``CameraStream.offer`` and never waits: a frame due by the
sampler is decoded and left in a latest-frame slot, overwriting (and counting) a frame the
model has not taken yet. A worker thread per camera takes frames from the slot and ingests
them. ``ModelGate`` lets one caller at a time use the model, questions before frames.
``FrameClock`` gives each frame its stream time, once, at the edge. Text events (``offer_text``)
wait in a short queue and are ingested by the same worker, before the next frame.

Nothing a message holds can stop a stream: a bad frame or stamp is counted
(``dropped_invalid``) and warned about; a failure inside the model or the KV policy is
counted (``failed``), logged with its reason and kept as ``last_error``, and the worker goes
on with the next frame.
"""

from __future__ import annotations

import math
import threading
import traceback
from collections import deque
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np

from mosaic_ros.nodes.image_codec import ImageDecodeError, fit_longest_side
from mosaic_ros.nodes.sampling import FrameSampler
from mosaic_ros.runtime.models import FrameError
from mosaic_ros.runtime.session import SessionError, SessionStatus, StreamFault, StreamSession

TEXT_QUEUE = 64  # text events waiting for the worker, per stream


class StampRefused(ValueError):
    """A frame whose header stamp cannot be a stream time; the message says why."""


class FrameClock:
    """A camera's frame times, decided once per stream from the header stamps.

    A stream whose first frame is stamped keeps header stamps: a later frame stamped 0 (no
    stamp) is refused rather than given the receipt time, which on another clock would look
    like a jump in time. A stream whose first frame is unstamped uses the time of receipt
    (``now()``, s) for every frame. Negative or non-finite stamps are refused.
    """

    def __init__(self, now: Callable[[], float]):
        self._now = now
        self.uses_receipt_time: bool | None = None  # None until the first valid frame

    def time_of(self, stamp: float) -> float:
        """The stream time (s) of a frame with header ``stamp`` (s); ``StampRefused`` if none."""
        if not (math.isfinite(stamp) and stamp >= 0.0):
            raise StampRefused(f"frame stamp {stamp} s is not a finite time >= 0")
        if self.uses_receipt_time is None:
            self.uses_receipt_time = stamp == 0.0
        if self.uses_receipt_time:
            return self._now()
        if stamp == 0.0:
            raise StampRefused("frame has no header stamp (0) on a stream whose frames are stamped")
        return stamp


@dataclass
class Frame:
    """A decoded frame (H, W, 3) RGB uint8 waiting for the model, with its stamp (s)."""

    pixels: np.ndarray
    stamp: float
    reset_before: bool = False


class LatestFrameSlot:
    """Holds at most one frame; a new frame replaces one nobody took."""

    def __init__(self):
        self._cond = threading.Condition()
        self._frame: Frame | None = None

    def put(self, frame: Frame) -> bool:
        """Store ``frame``; True when it replaced an untaken one (whose reset request it keeps)."""
        with self._cond:
            replaced = self._frame
            if replaced is not None:
                frame.reset_before = frame.reset_before or replaced.reset_before
            self._frame = frame
            self._cond.notify()
            return replaced is not None

    def take(self, timeout: float) -> Frame | None:
        """The waiting frame, or None after ``timeout`` seconds."""
        with self._cond:
            if self._frame is None:
                self._cond.wait(timeout)
            frame, self._frame = self._frame, None
            return frame

    def wake(self) -> None:
        with self._cond:
            self._cond.notify_all()


class ModelGate:
    """One user of the model at a time. Questions go first, in arrival order; frames (and text
    events) wait until no question is waiting, then go in arrival order too."""

    def __init__(self):
        self._cond = threading.Condition()
        self._busy = False
        self._questions: deque[object] = deque()
        self._frames: deque[object] = deque()

    @contextmanager
    def question(self, give_up: Callable[[], bool]) -> Iterator[bool]:
        """Yields True once the model is ours, False if ``give_up()`` turned true first."""
        ticket = object()
        with self._cond:
            self._questions.append(ticket)
            try:
                while (self._busy or self._questions[0] is not ticket) and not give_up():
                    self._cond.wait(0.05)
                acquired = not self._busy and self._questions[0] is ticket
                self._busy = self._busy or acquired
            finally:
                self._questions.remove(ticket)
                self._cond.notify_all()
        try:
            yield acquired
        finally:
            if acquired:
                self._release()

    @contextmanager
    def frame(self, give_up: Callable[[], bool]) -> Iterator[bool]:
        """Like ``question``, for a frame or text event of any stream: waits while any question
        is waiting, then goes in arrival order among them, so that a stream that asks again the
        moment it lets go (a queue of text events) cannot starve the others."""
        ticket = object()
        with self._cond:
            self._frames.append(ticket)
            try:
                while (self._busy or self._questions or self._frames[0] is not ticket) and not give_up():
                    self._cond.wait(0.05)
                acquired = not (self._busy or self._questions) and self._frames[0] is ticket
                self._busy = self._busy or acquired
            finally:
                self._frames.remove(ticket)
                self._cond.notify_all()
        try:
            yield acquired
        finally:
            if acquired:
                self._release()

    @property
    def frames_waiting(self) -> int:
        with self._cond:
            return len(self._frames)

    @property
    def questions_waiting(self) -> int:
        with self._cond:
            return len(self._questions)

    def _release(self) -> None:
        with self._cond:
            self._busy = False
            self._cond.notify_all()


@dataclass
class StreamCounters:
    """Frame counts since the node started (they survive resets of the memory)."""

    received: int = 0
    sampled: int = 0
    ingested: int = 0
    dropped_busy: int = 0
    dropped_invalid: int = 0
    faults: int = 0
    texts_ingested: int = 0
    texts_dropped: int = 0
    ingest_lag_ms: float = 0.0
    stamp_ahead_ms: float = 0.0
    last_error: str = ""


@dataclass
class StreamSnapshot:
    """Counters and memory of one stream at one moment."""

    counters: StreamCounters
    memory: SessionStatus


class CameraStream:
    """A camera's sampler, slot, ingest worker and session.

    ``now`` returns the node's clock in seconds (ROS time, simulated when ``use_sim_time``);
    a frame's ingest lag is ``now()`` after ingestion minus its stamp (0 when the stamp is
    ahead of the clock; how far ahead is ``stamp_ahead_ms``). ``log`` has the rclpy logger's
    ``info``/``warning``/``error`` methods.
    """

    def __init__(
        self,
        camera_id: str,
        topic: str,
        session: StreamSession,
        gate: ModelGate,
        sample_fps: float,
        max_frame_side: int,
        now: Callable[[], float],
        log,
    ):
        self.camera_id = camera_id
        self.topic = topic
        self.session = session
        self.max_frame_side = max_frame_side
        self._gate = gate
        self._now = now
        self._log = log
        self._sampler = FrameSampler(sample_fps)
        self._clock = FrameClock(now)
        self._slot = LatestFrameSlot()
        self._texts: deque[tuple[str, float]] = deque()
        self._lock = threading.Lock()
        self._counters = StreamCounters()
        self._last_stamp: float | None = None
        self._reset_pending = False
        self._warned_invalid = False
        self._faulted = False
        self._memory = session.status()
        self._stop = threading.Event()
        self._worker = threading.Thread(target=self._run, name=f"ingest-{camera_id}", daemon=True)

    # ---- lifecycle ---------------------------------------------------------------------

    def start(self) -> None:
        self._worker.start()

    def stop(self, timeout: float = 5.0) -> None:
        self._stop.set()
        self._slot.wake()
        if self._worker.is_alive():
            self._worker.join(timeout)

    @property
    def sample_fps(self) -> float:
        return self._sampler.fps

    @sample_fps.setter
    def sample_fps(self, fps: float) -> None:
        with self._lock:
            self._sampler.fps = fps

    # ---- frames (ROS callback side: never blocks on the model) ---------------------------

    def offer(self, stamp: float, decode: Callable[[], np.ndarray]) -> None:
        """A message arrived with header ``stamp`` (s, 0 for none); ``decode()`` gives its RGB
        pixels. Never raises: what cannot become a frame is counted and warned about."""
        with self._lock:
            self._counters.received += 1
            try:
                stamp = self._clock.time_of(stamp)
            except StampRefused as error:
                refused = str(error)
            else:
                refused = ""
                first_receipt = self._clock.uses_receipt_time and self._last_stamp is None
        if refused:
            self._count_invalid(refused)
            return
        if first_receipt:
            self._log.info(
                f"camera '{self.camera_id}': frames carry no header stamp; using their time of receipt"
            )
        with self._lock:
            jumped_back = self._last_stamp is not None and stamp < self._last_stamp
            self._last_stamp = stamp
            if jumped_back:
                self._sampler.reset()
                self._reset_pending = True
            if not self._sampler.is_due(stamp):
                return
        if jumped_back:
            self._log.info(
                f"camera '{self.camera_id}': time jumped back to {stamp:.3f} s (bag loop?); "
                "forgetting this stream's memory"
            )
        try:
            pixels = fit_longest_side(decode(), self.max_frame_side)
        except ImageDecodeError as error:
            self._count_invalid(str(error))
            return
        except Exception as error:  # a decoder's own error on input it does not expect
            self._count_invalid(f"could not be decoded ({type(error).__name__}: {error})")
            return
        frame = Frame(pixels, stamp)
        with self._lock:
            # The reset waits for the first valid frame after the jump, which the worker
            # ingests right after forgetting.
            frame.reset_before, self._reset_pending = self._reset_pending, False
            self._sampler.commit(stamp)
            self._counters.sampled += 1
            if self._slot.put(frame):
                self._counters.dropped_busy += 1

    def offer_text(self, text: str, stamp: float) -> None:
        """A text event (s, node clock) for this stream's memory; queued for the worker, never
        waits. Beyond ``TEXT_QUEUE`` waiting events the oldest is dropped and counted."""
        with self._lock:
            if len(self._texts) >= TEXT_QUEUE:
                self._texts.popleft()
                self._counters.texts_dropped += 1
            self._texts.append((text, stamp))
        self._slot.wake()

    def _count_invalid(self, reason: str) -> None:
        # Logged before counted: a status that shows the count comes after the log line.
        with self._lock:
            first = not self._warned_invalid
            self._warned_invalid = True
        if first:
            self._log.warning(
                f"dropping invalid frame on {self.topic}: {reason} (warned once per topic; "
                "further invalid frames only count in frames_dropped_invalid)"
            )
        with self._lock:
            self._counters.dropped_invalid += 1

    # ---- worker ------------------------------------------------------------------------

    def _run(self) -> None:
        while not self._stop.is_set():
            frame = self._slot.take(timeout=0.2)
            self._ingest_texts()
            if frame is None:
                continue
            try:
                with self._gate.frame(self._stop.is_set) as acquired:
                    if acquired:
                        self._ingest(frame)
            except Exception as error:  # the worker must outlive any failure; the next frame may work
                self.record_fault(f"ingesting the frame at {frame.stamp:.3f} s", error)

    def _ingest(self, frame: Frame) -> None:
        """Called holding the model gate."""
        try:
            if frame.reset_before:
                self.session.reset()
            self.session.ingest(frame.pixels, frame.stamp, channel_order="rgb")
        except (FrameError, SessionError) as error:
            self._count_invalid(str(error))
        except StreamFault as error:
            self.record_fault(f"ingesting the frame at {frame.stamp:.3f} s", error)
        else:
            now = self._now()

            def count(counters: StreamCounters) -> None:
                counters.ingested += 1
                if now > 0.0:  # on simulated time the clock reads 0 until the first /clock
                    lag_ms = (now - frame.stamp) * 1e3
                    counters.ingest_lag_ms = max(lag_ms, 0.0)
                    counters.stamp_ahead_ms = max(-lag_ms, 0.0)

            self.refresh_memory(count)
            return
        self.refresh_memory()  # a failed frame may still have changed the memory (a reset)

    def _ingest_texts(self) -> None:
        """Ingest the queued text events, each taken from the queue once the model is ours (so
        that a busy model leaves them queued, where the newest ones are kept)."""
        while not self._stop.is_set():
            with self._lock:
                if not self._texts:
                    return
            try:
                with self._gate.frame(self._stop.is_set) as acquired:
                    if not acquired:
                        return
                    with self._lock:
                        text, stamp = self._texts.popleft()
                    self._add_text(text, stamp)
            except Exception as error:  # the worker must outlive any failure
                self.record_fault("adding a text event", error)

    def _add_text(self, text: str, stamp: float) -> None:
        """Called holding the model gate."""
        try:
            self.session.add_text(text, stamp)
        except SessionError as error:
            self._log.warning(f"camera '{self.camera_id}': dropping a text event: {error}")
            with self._lock:
                self._counters.texts_dropped += 1
        except Exception as error:  # StreamFault or worse: counted like a frame's
            self.record_fault(f"adding the text event at {stamp:.3f} s", error)
        else:

            def count(counters: StreamCounters) -> None:
                counters.texts_ingested += 1

            self.refresh_memory(count)
            return
        self.refresh_memory()

    def record_fault(self, doing: str, error: BaseException | str) -> None:
        """Count and log a failure that was not the input's fault (it shows as ERROR on
        /diagnostics until a period passes without one)."""
        reason = error if isinstance(error, str) else f"{type(error).__name__}: {error}"
        with self._lock:
            first, self._faulted = not self._faulted, True
        detail = ""
        if first and isinstance(error, BaseException):  # the first one with its stack, for a bug report
            detail = "\n" + "".join(traceback.format_exception(error)).rstrip()
        # Logged before counted: a status that shows the fault comes after the log line.
        self._log.error(f"camera '{self.camera_id}': {doing} failed: {reason}{detail}")
        with self._lock:
            self._counters.faults += 1
            self._counters.last_error = f"{doing}: {reason}"

    def refresh_memory(self, count: Callable[[StreamCounters], None] | None = None) -> None:
        """Re-read the session's memory figures (call holding the model gate). ``count``, when
        given, updates the counters under the same lock, so that no status shows a frame or
        text event counted without the memory it made, or the other way round."""
        memory = self.session.status()
        with self._lock:
            self._memory = memory
            if count is not None:
                count(self._counters)

    def continue_from(self, stamp: float | None) -> None:
        """The session was restored up to ``stamp`` (s, None: no frame): a frame stamped before
        it is a jump back in time, which forgets the memory as a bag loop does (call before
        ``start``)."""
        with self._lock:
            self._last_stamp = stamp
        self.refresh_memory()

    def reset(self) -> None:
        """Forget everything seen so far (call holding the model gate)."""
        self.session.reset()
        self.refresh_memory()

    def snapshot(self) -> StreamSnapshot:
        """Counters and the latest memory figures; never waits for the model."""
        with self._lock:
            counters = StreamCounters(**vars(self._counters))
            return StreamSnapshot(counters=counters, memory=self._memory)
