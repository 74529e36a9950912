"""``mosaic_stream``: camera topics into a vision-language model's memory; questions answered
over ``~/ask`` (service) and ``~/ask_stream`` (action, tokens as feedback).

Run: ``mosaic-ros-stream --params config/stream.yaml [--ros-args -p key:=value ...]``
(``--params FILE`` is handed to rclpy as ``--ros-args --params-file FILE``).
"""

from __future__ import annotations

import math
import os
import signal
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

import rclpy
from diagnostic_msgs.msg import DiagnosticArray, DiagnosticStatus, KeyValue
from rclpy.action import ActionServer, CancelResponse, GoalResponse
from rclpy.callback_groups import MutuallyExclusiveCallbackGroup, ReentrantCallbackGroup
from rclpy.clock import Clock, ClockType
from rclpy.exceptions import NameValidationException, ParameterException, ParameterUninitializedException
from rclpy.executors import ExternalShutdownException, MultiThreadedExecutor
from rclpy.logging import get_logger
from rclpy.node import Node
from rclpy.parameter import Parameter
from rclpy.qos import QoSProfile, qos_profile_sensor_data
from rclpy.qos_overriding_options import QoSOverridingOptions
from rclpy.signals import SignalHandlerOptions
from sensor_msgs.msg import CompressedImage, Image
from std_srvs.srv import Trigger

from mosaic_ros.action import AskVideo as AskVideoAction
from mosaic_ros.msg import LatencyStats as LatencyStatsMsg
from mosaic_ros.msg import StreamStatus
from mosaic_ros.nodes.camera_stream import CameraStream, ModelGate
from mosaic_ros.nodes.image_codec import decode_compressed, decode_image_msg
from mosaic_ros.nodes.processes import READY_MARK
from mosaic_ros.nodes.stream_params import PARAMETERS, PARAMETERS_BY_NAME
from mosaic_ros.runtime.models import ModelLoadError, load_model
from mosaic_ros.runtime.session import SessionConfig, SessionError, StreamSession, TimeWindow
from mosaic_ros.runtime.stats import LatencyStats
from mosaic_ros.srv import AskVideo

# /diagnostics turns WARN when, over one status period, more than this share of the sampled
# frames was overwritten before the model took it, or when the latest frame's ingest lag
# exceeds LAG_WARN_S.
HEAVY_DROP_SHARE = 0.5
LAG_WARN_S = 2.0
SPIN_PERIOD_S = 0.2
# On shutdown: at most this long for answers in flight to stop, then this many more turns
# of the executor to send their replies.
DRAIN_S = 2.0
DRAIN_SPINS = 4
SENSOR_QOS = QoSProfile(
    history=qos_profile_sensor_data.history,
    depth=1,
    reliability=qos_profile_sensor_data.reliability,
    durability=qos_profile_sensor_data.durability,
)


class RequestError(ValueError):
    """A request the node refuses; the message is the response's ``error``."""


@dataclass
class Outcome:
    """What a question came to: an answer, or an error, with its cost."""

    success: bool
    answer: str
    error: str
    stats: LatencyStats
    cancelled: bool = False


def camera_ids_for(topics: list[str], names: list[str] | None) -> list[str]:
    """Stream names: ``names`` when given (one per topic), else derived from the topics,
    e.g. ``/front/image_raw/compressed`` -> ``front``; duplicates get ``_2``, ``_3``..."""
    if names:
        if len(names) != len(topics):
            raise ValueError(f"camera_ids has {len(names)} names for {len(topics)} camera_topics")
        if len(set(names)) != len(names) or not all(names):
            raise ValueError(f"camera_ids must be distinct and non-empty, got {names}")
        return list(names)
    ids: list[str] = []
    for topic in topics:
        parts = [p for p in topic.split("/") if p]
        if parts and parts[-1] == "compressed":
            parts.pop()
        if len(parts) > 1 and parts[-1].startswith("image"):
            parts.pop()
        base = "_".join(parts) or "camera"
        name, n = base, 1
        while name in ids:
            n += 1
            name = f"{base}_{n}"
        ids.append(name)
    return ids


def stats_to_msg(stats: LatencyStats) -> LatencyStatsMsg:
    """The message with every field of ``stats`` (the two have the same field names)."""
    msg = LatencyStatsMsg()
    types = msg.get_fields_and_field_types()
    for name, value in stats.as_dict().items():
        kind = types[name]
        if kind == "string":
            setattr(msg, name, str(value))
        elif kind.startswith(("float", "double")):
            setattr(msg, name, float(value))
        else:
            setattr(msg, name, int(value))
    return msg


def stamp_seconds(stamp) -> float:
    """A ``builtin_interfaces/Time`` in seconds."""
    return stamp.sec + stamp.nanosec * 1e-9


class StreamNode(Node):
    """Subscribes to cameras, feeds one ``StreamSession`` per camera, answers questions."""

    def __init__(self):
        super().__init__("mosaic_stream")
        for spec in PARAMETERS:
            value = spec.default if spec.default is not None else Parameter.Type(spec.type)
            self.declare_parameter(spec.name, value, spec.descriptor())
        p = self._param
        topics = list(p("camera_topics"))
        if not topics:
            raise ValueError("camera_topics is empty: give at least one image topic")
        ids = camera_ids_for(topics, self._param_or_none("camera_ids"))
        self.get_logger().info(f"loading model {p('model')!r} on device {p('device')!r}")
        adapter = load_model(p("model"), device=p("device"), dtype=p("dtype"), seed=p("seed"))
        if p("model").startswith("tiny-random:"):
            self.get_logger().warning("tiny-random model: random weights, answers are not meaningful")
        config = SessionConfig(
            policy=p("policy"),
            budget_tokens=p("budget_tokens"),
            window_tokens=p("window_tokens"),
            host_cap_bytes=int(p("host_cap_mb") * 2**20),
            maintain_budget_ms=p("maintain_budget_ms"),
            prefetch=p("prefetch"),
            max_question_chars=int(PARAMETERS_BY_NAME["max_question_chars"].high),
            max_new_tokens=p("max_new_tokens"),
            remember_dialogue=p("remember_dialogue"),
        )
        self._gate = ModelGate()
        self._closing = threading.Event()
        self._pending = 0
        self._pending_lock = threading.Lock()
        self.streams: dict[str, CameraStream] = {}
        for camera_id, topic in zip(ids, topics, strict=True):
            self.streams[camera_id] = CameraStream(
                camera_id,
                topic,
                StreamSession(adapter, config),
                self._gate,
                sample_fps=p("sample_fps"),
                max_frame_side=p("max_frame_side"),
                now=self._now_s,
                log=self.get_logger(),
            )
        self.default_camera = ids[0]
        # Enough threads that every camera, every admitted question and one more request
        # (answered "busy" at once), the status timer and ~/reset can run together.
        self.executor_threads = len(ids) + p("max_pending_questions") + 3

        for stream in self.streams.values():
            self._subscribe(stream)
        questions = ReentrantCallbackGroup()
        self.create_service(AskVideo, "~/ask", self._on_ask, callback_group=questions)
        self.create_service(Trigger, "~/reset", self._on_reset, callback_group=questions)
        self._action_server = ActionServer(
            self,
            AskVideoAction,
            "~/ask_stream",
            execute_callback=self._on_ask_stream,
            goal_callback=lambda _goal: GoalResponse.ACCEPT,
            cancel_callback=lambda _goal_handle: CancelResponse.ACCEPT,
            callback_group=questions,
        )
        self._status_pub = self.create_publisher(StreamStatus, "~/status", 10)
        self._diagnostics_pub = self.create_publisher(DiagnosticArray, "/diagnostics", 10)
        self._status_group = MutuallyExclusiveCallbackGroup()
        self._status_timer = None
        self._last_report: dict[str, tuple[float, object]] = {}
        self._start_status_timer(p("status_period_s"))
        self.add_post_set_parameters_callback(self._apply_parameters)
        for stream in self.streams.values():
            stream.start()
        cameras = ", ".join(f"{s.camera_id} <- {s.topic}" for s in self.streams.values())
        self.get_logger().info(f"{READY_MARK} {config.policy}; cameras {cameras}")

    def _param(self, name: str):
        return self.get_parameter(name).value

    def _param_or_none(self, name: str):
        """The value of a parameter declared without a default, None while it is not set."""
        try:
            return self._param(name)
        except ParameterUninitializedException:
            return None

    def _now_s(self) -> float:
        return self.get_clock().now().nanoseconds * 1e-9

    # ---- frames ------------------------------------------------------------------------

    def _subscribe(self, stream: CameraStream) -> None:
        compressed = stream.topic.rstrip("/").endswith("/compressed")
        decode = _decode_compressed_msg if compressed else decode_image_msg

        def on_frame(msg) -> None:
            stamp = stamp_seconds(msg.header.stamp) or self._now_s()
            stream.offer(stamp, lambda: decode(msg))

        # qos_overrides.<topic>.subscription.{reliability,depth,...} parameters may change the
        # QoS, e.g. to reliable for a bag played by a reliable publisher that must not lose any.
        self.create_subscription(
            CompressedImage if compressed else Image,
            stream.topic,
            on_frame,
            SENSOR_QOS,
            callback_group=MutuallyExclusiveCallbackGroup(),
            qos_overriding_options=QoSOverridingOptions.with_default_policies(),
        )

    # ---- questions ---------------------------------------------------------------------

    def _on_ask(self, request: AskVideo.Request, response: AskVideo.Response) -> AskVideo.Response:
        outcome = self.answer(request, on_progress=None, cancelled=self._closing.is_set)
        response.success, response.answer, response.error = outcome.success, outcome.answer, outcome.error
        response.stats = stats_to_msg(outcome.stats)
        return response

    def _on_ask_stream(self, goal_handle) -> AskVideoAction.Result:
        def progress(stage: str, text: str, tokens: int) -> None:
            goal_handle.publish_feedback(
                AskVideoAction.Feedback(stage=stage, partial_answer=text, tokens_generated=tokens)
            )

        def cancelled() -> bool:
            return goal_handle.is_cancel_requested or self._closing.is_set()

        outcome = self.answer(goal_handle.request, on_progress=progress, cancelled=cancelled)
        result = AskVideoAction.Result(
            success=outcome.success,
            answer=outcome.answer,
            error=outcome.error,
            stats=stats_to_msg(outcome.stats),
        )
        if goal_handle.is_cancel_requested:
            goal_handle.canceled()
        elif outcome.success:
            goal_handle.succeed()
        else:
            goal_handle.abort()
        return result

    def answer(
        self,
        request,
        on_progress: Callable[[str, str, int], None] | None,
        cancelled: Callable[[], bool],
    ) -> Outcome:
        """Answer an AskVideo request (service or action goal); never raises.

        ``on_progress(stage, partial_answer, tokens)`` reports 'queued', 'retrieving',
        'generating' (per token) and 'done'. ``cancelled()`` true stops the answer.
        """
        received = time.perf_counter()
        policy = self._param("policy")
        with self._pending_lock:
            pending = self._pending
            admitted = pending < self._param("max_pending_questions")
            self._pending += admitted
        if not admitted:
            return self._refused(f"busy: {pending} questions pending; ask again later", policy, received)
        try:
            return self._answer_admitted(request, on_progress, cancelled, received, policy)
        finally:
            with self._pending_lock:
                self._pending -= 1

    def _answer_admitted(self, request, on_progress, cancelled, received, policy) -> Outcome:
        report = on_progress or (lambda stage, text, tokens: None)
        try:
            stream, window, max_new_tokens = self._validate(request)
        except (RequestError, SessionError) as error:
            return self._refused(str(error), policy, received)
        report("queued", "", 0)
        text, tokens = "", 0

        def on_token(piece: str, _token_id: int) -> bool:
            nonlocal text, tokens
            text, tokens = text + piece, tokens + 1
            report("generating", text, tokens)
            return not cancelled()

        with self._gate.question(cancelled) as acquired:
            if not acquired:
                stats = self._refused_stats(policy, received)
                return Outcome(False, "", "cancelled while queued", stats, cancelled=True)
            report("retrieving", "", 0)
            called = time.perf_counter()
            try:
                answer = stream.session.ask(
                    request.question, window=window, max_new_tokens=max_new_tokens, on_token=on_token
                )
            except SessionError as error:
                return self._refused(str(error), policy, received)
            except Exception as error:  # a model failure must not take the node down
                reason = f"internal error: {type(error).__name__}: {error}"
                self.get_logger().error(f"question on '{stream.camera_id}' failed: {reason}")
                return self._refused(reason, policy, received)
            finally:
                stream.refresh_memory()
        waited_ms = (called - received) * 1e3
        stats = answer.stats
        stats.queue_ms += waited_ms
        stats.ttft_ms += waited_ms
        stats.total_ms += waited_ms
        report("done", answer.text, stats.tokens_generated)
        error = "cancelled" if answer.cancelled else ""
        self.get_logger().info(
            f"answered on '{stream.camera_id}' ({stats.tokens_generated} tokens, {stats.total_ms:.0f} ms"
            f"{', cancelled' if answer.cancelled else ''}): {request.question[:60]!r}"
        )
        return Outcome(not answer.cancelled, answer.text, error, stats, answer.cancelled)

    def _validate(self, request) -> tuple[CameraStream, TimeWindow | None, int]:
        """The stream, time window and answer length a request asks for; RequestError if invalid."""
        question = request.question
        if not question.strip():
            raise RequestError("question is empty")
        limit = self._param("max_question_chars")
        if len(question) > limit:
            raise RequestError(f"question has {len(question)} characters; the limit is {limit}")
        camera_id = request.camera_id or self.default_camera
        if camera_id not in self.streams:
            raise RequestError(f"unknown camera_id {camera_id!r}; known: {', '.join(self.streams)}")
        stream = self.streams[camera_id]
        max_new_tokens = request.max_new_tokens or self._param("max_new_tokens")
        cap = int(PARAMETERS_BY_NAME["max_new_tokens"].high)
        if max_new_tokens > cap:
            raise RequestError(f"max_new_tokens {max_new_tokens} is above the limit of {cap}")
        last = stream.session.last_stamp
        if last is None:
            raise RequestError(
                f"no frame has been ingested on camera '{camera_id}' yet; ask again once it streams"
            )
        return stream, self._window(request, last), max_new_tokens

    @staticmethod
    def _window(request, last: float) -> TimeWindow | None:
        seconds = request.window_seconds
        start, end = stamp_seconds(request.window_start), stamp_seconds(request.window_end)
        if math.isnan(seconds) or seconds < 0:
            raise RequestError(f"window_seconds must be >= 0, got {seconds}")
        if seconds > 0 and (start or end):
            raise RequestError("give either window_seconds or window_start/window_end, not both")
        if seconds > 0:
            return TimeWindow.last(seconds, last)
        if start or end:
            return TimeWindow(start, end or max(last, start))
        return None

    def _refused(self, error: str, policy: str, received: float) -> Outcome:
        return Outcome(False, "", error, self._refused_stats(policy, received))

    @staticmethod
    def _refused_stats(policy: str, received: float) -> LatencyStats:
        return LatencyStats(policy=policy, total_ms=(time.perf_counter() - received) * 1e3)

    def _on_reset(self, _request: Trigger.Request, response: Trigger.Response) -> Trigger.Response:
        with self._gate.question(self._closing.is_set) as acquired:
            if acquired:
                for stream in self.streams.values():
                    stream.reset()
        response.success = acquired
        response.message = (
            f"forgot the memory of {len(self.streams)} streams" if acquired else "node is shutting down"
        )
        return response

    # ---- status ------------------------------------------------------------------------

    def _start_status_timer(self, period_s: float) -> None:
        if self._status_timer is not None:
            self.destroy_timer(self._status_timer)
        # A steady clock, so status keeps coming when simulated time stops (bag paused or ended).
        self._status_timer = self.create_timer(
            period_s,
            self._publish_status,
            callback_group=self._status_group,
            clock=Clock(clock_type=ClockType.STEADY_TIME),
        )

    def _publish_status(self) -> None:
        now_msg = self.get_clock().now().to_msg()
        diagnostics = DiagnosticArray()
        diagnostics.header.stamp = now_msg
        pending = self.pending_questions
        for stream in self.streams.values():
            snap = stream.snapshot()
            c, m = snap.counters, snap.memory
            status = StreamStatus(
                stream_id=stream.camera_id,
                topic=stream.topic,
                frames_received=c.received,
                frames_sampled=c.sampled,
                frames_ingested=c.ingested,
                frames_dropped_busy=c.dropped_busy,
                frames_dropped_invalid=c.dropped_invalid,
                ingest_lag_ms=c.ingest_lag_ms,
                ingest_ms_mean=m.ingest_ms_mean,
                stream_seconds=m.stream_seconds,
                tokens_in_memory=m.tokens_in_memory,
                host_kv_bytes=m.host_kv_bytes,
                device_kv_bytes=m.device_kv_bytes,
                clusters_in_memory=m.clusters_in_memory,
                tokens_evicted=m.tokens_evicted,
                policy=m.policy,
            )
            status.header.stamp = now_msg
            status.header.frame_id = stream.camera_id
            self._status_pub.publish(status)
            diagnostics.status.append(self._diagnose(stream, c, m, pending))
        self._diagnostics_pub.publish(diagnostics)

    def _diagnose(self, stream: CameraStream, c, m, pending: int) -> DiagnosticStatus:
        """One camera's health: rates over the last period, drops, lag and memory."""
        now = time.monotonic()
        then, before = self._last_report.get(stream.camera_id, (now, c))
        self._last_report[stream.camera_id] = (now, c)
        elapsed = now - then

        def rate(field: str) -> float:
            return (getattr(c, field) - getattr(before, field)) / elapsed if elapsed > 0 else 0.0

        sampled = c.sampled - before.sampled
        busy = c.dropped_busy - before.dropped_busy
        invalid = c.dropped_invalid - before.dropped_invalid
        problems = []
        if sampled and busy / sampled > HEAVY_DROP_SHARE:
            problems.append(f"dropping {busy} of {sampled} sampled frames (model busy)")
        if invalid:
            problems.append(f"{invalid} invalid frames")
        if c.ingested and c.ingest_lag_ms > LAG_WARN_S * 1e3:
            problems.append(f"ingest lags {c.ingest_lag_ms / 1e3:.1f} s behind frame stamps")
        if problems:
            level, message = DiagnosticStatus.WARN, "; ".join(problems)
        elif c.received == 0:
            level, message = DiagnosticStatus.OK, "waiting for frames"
        else:
            level, message = DiagnosticStatus.OK, "streaming"
        values = {
            "topic": stream.topic,
            "received_fps": f"{rate('received'):.2f}",
            "ingested_fps": f"{rate('ingested'):.2f}",
            "sample_fps": f"{stream.sample_fps:g}",
            "frames_received": c.received,
            "frames_ingested": c.ingested,
            "frames_dropped_busy": c.dropped_busy,
            "frames_dropped_invalid": c.dropped_invalid,
            "ingest_lag_ms": f"{c.ingest_lag_ms:.1f}",
            "ingest_ms_mean": f"{m.ingest_ms_mean:.1f}",
            "stream_seconds": f"{m.stream_seconds:.1f}",
            "tokens_in_memory": m.tokens_in_memory,
            "host_kv_bytes": m.host_kv_bytes,
            "device_kv_bytes": m.device_kv_bytes,
            "questions_pending": pending,
            "policy": m.policy,
        }
        return DiagnosticStatus(
            level=level,
            name=f"{self.get_name()}: camera {stream.camera_id}",
            message=message,
            hardware_id=stream.topic,
            values=[KeyValue(key=k, value=str(v)) for k, v in values.items()],
        )

    # ---- parameters --------------------------------------------------------------------

    def _apply_parameters(self, params: list[Parameter]) -> None:
        """Apply live parameters once rclpy has set them. The others are declared read-only,
        so rclpy refuses to change them (\"Trying to set a read-only parameter\")."""
        for param in params:
            if param.name == "sample_fps":
                for stream in self.streams.values():
                    stream.sample_fps = param.value
            elif param.name == "status_period_s":
                self._start_status_timer(param.value)
        self.get_logger().info("parameters set: " + ", ".join(f"{p.name}={p.value}" for p in params))

    # ---- shutdown ----------------------------------------------------------------------

    @property
    def pending_questions(self) -> int:
        with self._pending_lock:
            return self._pending

    def close(self) -> None:
        """Cancel answers in flight and stop the ingest workers."""
        self._closing.set()
        for stream in self.streams.values():
            stream.stop()


def _decode_compressed_msg(msg):
    return decode_compressed(msg.data)


def ros_arguments(argv: list[str]) -> list[str]:
    """``argv`` with ``--params FILE`` turned into ``--ros-args --params-file FILE``, placed
    before any ``--ros-args`` the user gave so that their ``-p key:=value`` take precedence."""
    argv = list(argv)
    files: list[str] = []
    while "--params" in argv:
        i = argv.index("--params")
        if i + 1 >= len(argv):
            raise SystemExit("--params needs a YAML file")
        files.append(argv[i + 1])
        del argv[i : i + 2]
    if not files:
        return argv
    head = argv[:1]
    extra = [arg for f in files for arg in ("--params-file", f)]
    return [*head, "--ros-args", *extra, "--", *argv[1:]]


def _interrupt_on_signals() -> None:
    """SIGINT and SIGTERM raise KeyboardInterrupt in the main thread (also where the shell
    started the node with SIGINT ignored, as it does for background jobs)."""

    def handler(_signum, _frame):
        raise KeyboardInterrupt

    signal.signal(signal.SIGINT, handler)
    signal.signal(signal.SIGTERM, handler)


def main(args: list[str] | None = None) -> None:
    """Process entry point: runs the node until Ctrl-C or SIGTERM, then exits the process
    (status 0, or 1 when the node cannot start)."""
    _exit_now(_run(args))


def _run(args: list[str] | None) -> int:
    # rclpy's own signal handlers would shut the context down at once, before answers in
    # flight are cancelled and their clients told; the node does that itself on Ctrl-C.
    rclpy.init(
        args=ros_arguments(sys.argv if args is None else args), signal_handler_options=SignalHandlerOptions.NO
    )
    _interrupt_on_signals()
    try:
        node = StreamNode()
    except (ModelLoadError, ValueError, ParameterException, NameValidationException) as error:
        get_logger("mosaic_stream").fatal(f"cannot start: {error}")
        rclpy.try_shutdown()
        return 1
    except KeyboardInterrupt:
        rclpy.try_shutdown()
        return 0
    executor = MultiThreadedExecutor(num_threads=node.executor_threads)
    executor.add_node(node)
    try:
        # A bounded wait, so that Ctrl-C is seen within SPIN_PERIOD_S even when nothing arrives.
        while rclpy.ok():
            executor.spin_once(timeout_sec=SPIN_PERIOD_S)
    except (KeyboardInterrupt, ExternalShutdownException):
        pass
    finally:
        node.close()
        _drain(node, executor)
        executor.shutdown(timeout_sec=5.0)
        node.destroy_node()
        rclpy.try_shutdown()
    return 0


def _drain(node: StreamNode, executor: MultiThreadedExecutor) -> None:
    """Keep spinning while cancelled answers wind down, so that their clients get a reply
    (action results are sent from executor callbacks)."""
    deadline = time.monotonic() + DRAIN_S
    try:
        while node.pending_questions and time.monotonic() < deadline:
            executor.spin_once(timeout_sec=0.05)
        for _ in range(DRAIN_SPINS):
            executor.spin_once(timeout_sec=0.05)
    except (KeyboardInterrupt, ExternalShutdownException):
        pass


def _exit_now(code: int) -> None:
    """Exit without the interpreter's teardown of torch and transformers, which takes
    seconds; ROS is shut down and nothing is left to flush but stdio."""
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


if __name__ == "__main__":
    main()
