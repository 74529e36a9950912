"""Questions from ROS requests to answers, without rclpy: admission, checks, windows, the model gate.

``QuestionDesk.answer`` takes a ``Question`` (the fields of an AskVideo request, in plain
types), checks it, waits for the model behind earlier questions and answers it. It never
raises: every request ends as an ``Outcome``, an answer or an error text the client gets as
is. The node converts messages to ``Question`` and ``Outcome`` to responses; nothing else.
"""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from enum import StrEnum

from mosaic_ros.nodes.camera_stream import CameraStream, ModelGate
from mosaic_ros.runtime.session import SessionError, StreamFault, TimeWindow
from mosaic_ros.runtime.stats import LatencyStats


class Stage(StrEnum):
    """Steps of a request, in order, as the action's feedback names them."""

    QUEUED = "queued"
    RETRIEVING = "retrieving"
    GENERATING = "generating"  # once per answer token
    DONE = "done"


class RequestError(ValueError):
    """A request the desk refuses; the message is the response's ``error``."""


@dataclass(frozen=True)
class Question:
    """An AskVideo request. Times are seconds (header-stamp time for ``window_start``/``_end``,
    0 = unset); ``camera_id`` empty = the default stream; ``max_new_tokens`` 0 = the default."""

    question: str
    camera_id: str = ""
    window_seconds: float = 0.0
    window_start: float = 0.0
    window_end: float = 0.0
    max_new_tokens: int = 0


@dataclass
class Outcome:
    """What a question came to: an answer, or an error, with its cost."""

    success: bool
    answer: str
    error: str
    stats: LatencyStats
    cancelled: bool = False


ProgressCallback = Callable[[Stage, str, int], None]


class QuestionDesk:
    """Admits, checks and answers questions about the streams, one at a time on the model.

    ``streams`` by camera id (the first is the default); ``max_pending`` questions may be
    answering or waiting at once, more are refused as busy. ``default_max_new_tokens`` and
    ``max_new_tokens_cap`` bound answers (the former may change while the node runs). ``log``
    has the rclpy logger's ``info``/``error`` methods.
    """

    def __init__(
        self,
        streams: dict[str, CameraStream],
        gate: ModelGate,
        policy: str,
        max_pending: int,
        default_max_new_tokens: int,
        max_new_tokens_cap: int,
        log,
    ):
        if not streams:
            raise ValueError("a question desk needs at least one stream")
        self.streams = streams
        self.default_camera = next(iter(streams))
        self.policy = policy
        self.max_pending = max_pending
        self.default_max_new_tokens = default_max_new_tokens
        self.max_new_tokens_cap = max_new_tokens_cap
        self._gate = gate
        self._log = log
        self._pending = 0
        self._lock = threading.Lock()

    @property
    def pending(self) -> int:
        """Questions answering or waiting now."""
        with self._lock:
            return self._pending

    def answer(
        self, request: Question, on_progress: ProgressCallback | None, cancelled: Callable[[], bool]
    ) -> Outcome:
        """Answer ``request``; never raises.

        ``on_progress(stage, partial_answer, tokens)`` reports each ``Stage``; ``cancelled()``
        true stops the answer (or the wait for the model). ``stats.total_ms``, ``queue_ms``
        and ``ttft_ms`` count from this call.
        """
        received = time.perf_counter()
        with self._lock:
            pending = self._pending
            admitted = pending < self.max_pending
            self._pending += admitted
        if not admitted:
            return self._refused(f"busy: {pending} questions pending; ask again later", received)
        try:
            return self._answer_admitted(request, on_progress, cancelled, received)
        except Exception as error:  # a failure here must reach the client, not the executor
            return self._failed(request, error, received)
        finally:
            with self._lock:
                self._pending -= 1

    # ---- checks ------------------------------------------------------------------------

    def check(self, request: Question) -> tuple[CameraStream, str, TimeWindow | None, int]:
        """(stream, question as asked, time window, answer length); ``RequestError`` or
        ``SessionError`` with the reason when the request cannot be served."""
        camera_id = request.camera_id or self.default_camera
        if camera_id not in self.streams:
            raise RequestError(f"unknown camera_id {camera_id!r}; known: {', '.join(self.streams)}")
        stream = self.streams[camera_id]
        question = stream.session.check_question(request.question)
        max_new_tokens = request.max_new_tokens or self.default_max_new_tokens
        if max_new_tokens > self.max_new_tokens_cap:
            raise RequestError(
                f"max_new_tokens {max_new_tokens} is above the limit of {self.max_new_tokens_cap}"
            )
        first, last = stream.session.first_stamp, stream.session.last_stamp
        if first is None or last is None:
            raise RequestError(
                f"no frame has been ingested on camera '{camera_id}' yet; ask again once it streams"
            )
        return stream, question, time_window(request, first, last), max_new_tokens

    # ---- answering ---------------------------------------------------------------------

    def _answer_admitted(self, request, on_progress, cancelled, received) -> Outcome:
        report = on_progress or (lambda stage, text, tokens: None)
        try:
            stream, question, window, max_new_tokens = self.check(request)
        except (RequestError, SessionError) as error:
            return self._refused(str(error), received)
        report(Stage.QUEUED, "", 0)
        text, tokens = "", 0

        def on_token(piece: str, _token_id: int) -> bool:
            nonlocal text, tokens
            text, tokens = text + piece, tokens + 1
            report(Stage.GENERATING, text, tokens)
            return not cancelled()

        with self._gate.question(cancelled) as acquired:
            if not acquired:
                stats = self._refused_stats(received)
                return Outcome(False, "", "cancelled while queued", stats, cancelled=True)
            report(Stage.RETRIEVING, "", 0)
            called = time.perf_counter()
            try:
                answer = stream.session.ask(
                    question, window=window, max_new_tokens=max_new_tokens, on_token=on_token
                )
            except SessionError as error:
                return self._refused(str(error), received)
            except StreamFault as error:
                stream.record_fault("keeping a question in memory", error)
                return self._refused(f"internal error: {error}", received)
            finally:
                stream.refresh_memory()
        waited_ms = (called - received) * 1e3
        stats = answer.stats
        stats.queue_ms += waited_ms
        stats.ttft_ms += waited_ms
        stats.total_ms = (time.perf_counter() - received) * 1e3
        report(Stage.DONE, answer.text, stats.tokens_generated)
        self._log.info(
            f"answered on '{stream.camera_id}' ({stats.tokens_generated} tokens, {stats.total_ms:.0f} ms"
            f"{', cancelled' if answer.cancelled else ''}): {question[:60]!r}"
        )
        error = "cancelled" if answer.cancelled else ""
        return Outcome(not answer.cancelled, answer.text, error, stats, answer.cancelled)

    def _failed(self, request: Question, error: Exception, received: float) -> Outcome:
        reason = f"internal error: {type(error).__name__}: {error}"
        stream = self.streams.get(request.camera_id or self.default_camera)
        if stream is not None:
            stream.record_fault("answering a question", error)
        else:
            self._log.error(f"question failed: {reason}")
        return self._refused(reason, received)

    def _refused(self, error: str, received: float) -> Outcome:
        return Outcome(False, "", error, self._refused_stats(received))

    def _refused_stats(self, received: float) -> LatencyStats:
        return LatencyStats(policy=self.policy, total_ms=(time.perf_counter() - received) * 1e3)


def time_window(request: Question, first: float, last: float) -> TimeWindow | None:
    """The video a request may retrieve, within the stream's ``[first, last]`` (s); None for all.

    ``window_seconds > 0`` is the last that many seconds up to the newest frame (any length,
    infinity included, is cut to the stream); ``window_start``/``window_end`` an absolute
    range (end 0: up to the newest frame). ``RequestError`` for a malformed window or one
    that holds no video.
    """
    seconds = request.window_seconds
    start, end = request.window_start, request.window_end
    if math.isnan(seconds) or seconds < 0:
        raise RequestError(f"window_seconds must be >= 0, got {seconds}")
    if seconds > 0 and (start or end):
        raise RequestError("give either window_seconds or window_start/window_end, not both")
    if seconds > 0:
        return TimeWindow(max(last - seconds, first), last)
    if not (start or end):
        return None
    end = end or max(last, start)
    if not (math.isfinite(start) and math.isfinite(end)) or end < start:
        raise RequestError(f"invalid time window [{start}, {end}]")
    if end < first or start > last:
        raise RequestError(
            f"the time window [{start:.3f}, {end:.3f}] s holds no video; "
            f"the stream holds [{first:.3f}, {last:.3f}] s"
        )
    return TimeWindow(start, end)
