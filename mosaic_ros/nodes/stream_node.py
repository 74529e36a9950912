"""``mosaic_stream``: camera topics into a vision-language model's memory; questions answered
over ``~/ask`` (service) and ``~/ask_stream`` (action, tokens as feedback).

The node is its callbacks: ``StreamNode()`` declares and checks its parameters (``settings``),
``start(sessions)`` wires the cameras, services and timers to the sessions handed in. The
work lives in ROS-free classes: ``CameraStream`` (frames), ``QuestionDesk`` (questions),
``MemoryKeeper`` (snapshots of the memory in ``memory_dir``).
``mosaic_ros.nodes.stream_main`` loads the model and runs the node.
"""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

from diagnostic_msgs.msg import DiagnosticArray, DiagnosticStatus, KeyValue
from rclpy.action import ActionServer, CancelResponse, GoalResponse
from rclpy.callback_groups import MutuallyExclusiveCallbackGroup, ReentrantCallbackGroup
from rclpy.clock import Clock, ClockType
from rclpy.exceptions import ParameterUninitializedException
from rclpy.node import Node
from rclpy.parameter import Parameter
from rclpy.qos import QoSProfile, qos_profile_sensor_data, qos_profile_services_default
from rclpy.qos_overriding_options import QoSOverridingOptions
from sensor_msgs.msg import CompressedImage, Image
from std_msgs.msg import String
from std_srvs.srv import Trigger

from mosaic_ros.action import AskVideo as AskVideoAction
from mosaic_ros.msg import LatencyStats as LatencyStatsMsg
from mosaic_ros.msg import StreamStatus
from mosaic_ros.nodes.camera_stream import CameraStream, ModelGate
from mosaic_ros.nodes.image_codec import decode_compressed, decode_image_msg
from mosaic_ros.nodes.memory_keeper import MemoryKeeper, check_camera_id, disk_tier_dir
from mosaic_ros.nodes.processes import READY_MARK
from mosaic_ros.nodes.questions import Outcome, Question, QuestionDesk, Stage
from mosaic_ros.nodes.stream_params import (
    POLICY_OPTION_PREFIX,
    NodeConfig,
    node_config,
    parameters,
    policy_option_parameters,
)
from mosaic_ros.runtime.config import ConfigError
from mosaic_ros.runtime.kv.policy import known_policies
from mosaic_ros.runtime.session import StreamSession
from mosaic_ros.runtime.stats import LatencyStats
from mosaic_ros.srv import AskVideo

# /diagnostics turns WARN when, over one status period, more than this share of the sampled
# frames was overwritten before the model took it, or when the latest frame's ingest lag
# (or its stamp's lead on the node clock) exceeds LAG_WARN_S.
HEAVY_DROP_SHARE = 0.5
LAG_WARN_S = 2.0
SENSOR_QOS = QoSProfile(
    history=qos_profile_sensor_data.history,
    depth=1,
    reliability=qos_profile_sensor_data.reliability,
    durability=qos_profile_sensor_data.durability,
)


def request_qos(max_pending_questions: int) -> QoSProfile:
    """Reliable service/action QoS whose queue holds a burst of requests well beyond what the
    node admits, so that each one is taken and answered (or refused as busy), none lost."""
    return QoSProfile(
        history=qos_profile_services_default.history,
        depth=4 * max_pending_questions + 32,
        reliability=qos_profile_services_default.reliability,
        durability=qos_profile_services_default.durability,
    )


@dataclass(frozen=True)
class NodeSettings:
    """What the node was started with: its parameters as the tree (``config``; the live ones as
    they were at start), the camera topics given and their stream names."""

    config: NodeConfig
    topics: list[str]
    camera_ids: list[str]


def camera_ids_for(topics: list[str], names: list[str] | None) -> list[str]:
    """Stream names: ``names`` when given (one per topic), else derived from the topics,
    e.g. ``/front/image_raw/compressed`` -> ``front``; duplicates get ``_2``, ``_3``..."""
    if names:
        if len(names) != len(topics):
            raise ConfigError(f"camera_ids has {len(names)} names for {len(topics)} camera_topics")
        if len(set(names)) != len(names) or not all(names):
            raise ConfigError(f"camera_ids must be distinct and non-empty, got {names}")
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
    """A ``builtin_interfaces/Time`` in seconds (NaN for a nanosecond field of 1 s or more)."""
    if not 0 <= stamp.nanosec < 1_000_000_000:
        return math.nan
    return stamp.sec + stamp.nanosec * 1e-9


def question_of(request) -> Question:
    """The plain ``Question`` of an AskVideo service request or action goal."""
    return Question(
        question=request.question,
        camera_id=request.camera_id,
        window_seconds=request.window_seconds,
        window_start=stamp_seconds(request.window_start),
        window_end=stamp_seconds(request.window_end),
        max_new_tokens=request.max_new_tokens,
    )


class StreamNode(Node):
    """Subscribes to cameras, feeds one ``StreamSession`` per camera, answers questions.

    ``node_options``: rclpy ``Node`` keywords (e.g. ``context``, ``cli_args``, ``parameter_overrides``).
    Raises ``ConfigError`` (a ``ValueError``) for a parameter set it cannot start with."""

    def __init__(self, **node_options):
        super().__init__("mosaic_stream", **node_options)
        self.parameter_specs = parameters()
        for spec in self.parameter_specs.values():
            value = spec.default if spec.default is not None else Parameter.Type(spec.type)
            self.declare_parameter(spec.name, value, spec.descriptor())
        policy = self._param("policy")
        if policy not in known_policies():
            raise ConfigError(f"unknown KV policy {policy!r}; known: {', '.join(known_policies())}")
        self.policy_option_specs = policy_option_parameters(policy)
        for spec in self.policy_option_specs:
            self.declare_parameter(spec.name, spec.default, spec.descriptor())
        self._refuse_unknown_parameters()
        self.settings = self._read_settings()
        self.streams: dict[str, CameraStream] = {}
        self._closing = threading.Event()
        self._last_report: dict[str, tuple[float, object]] = {}
        self.keeper: MemoryKeeper | None = None

    # ---- parameters ------------------------------------------------------------------------

    def _param(self, name: str):
        return self.get_parameter(name).value

    def _param_or_none(self, name: str):
        """The value of a parameter declared without a default, None while it is not set."""
        try:
            return self._param(name)
        except ParameterUninitializedException:
            return None

    def _refuse_unknown_parameters(self) -> None:
        """A key in the params file or on the command line that the node does not have is a
        mistake (a misspelling would otherwise be ignored in silence)."""
        given = set(self._parameter_overrides)  # rclpy keeps what files and -p gave this node
        unknown = sorted(
            name for name in given - set(self._parameters) if not name.startswith("qos_overrides.")
        )
        if unknown:
            known = ", ".join(sorted(self._parameters))
            raise ConfigError(f"unknown parameter(s) {', '.join(unknown)}; known: {known}")

    def _read_settings(self) -> NodeSettings:
        values = {name: self._param_or_none(name) for name in self.parameter_specs}
        values["policy_options"] = {  # those set away from the policy's defaults, as a session takes them
            spec.name.removeprefix(POLICY_OPTION_PREFIX): self._param(spec.name)
            for spec in self.policy_option_specs
            if self._param(spec.name) != spec.default
        }
        topics = [t for t in values["camera_topics"] or [] if t]  # [] in YAML: not set
        if not topics:
            raise ConfigError("camera_topics is empty: give at least one image topic")
        if values["memory_dir"] and values["disk_cap_mb"] and not values["disk_dir"]:
            try:  # the disk tier's files default to memory_dir/.disk
                values["disk_dir"] = disk_tier_dir(values["memory_dir"])
            except OSError as error:
                raise ConfigError(
                    f"cannot make the disk tier's directory under memory_dir: {error}"
                ) from None
        config = node_config({**values, "camera_topics": topics})
        camera_ids = camera_ids_for(topics, config.camera_ids)
        if config.memory_dir:
            for camera_id in camera_ids:
                if (why := check_camera_id(camera_id)) is not None:
                    raise ConfigError(why)
        return NodeSettings(config, topics, camera_ids)

    def _apply_parameters(self, params: list[Parameter]) -> None:
        """Apply live parameters once rclpy has set them. The others are declared read-only,
        so rclpy refuses to change them (\"Trying to set a read-only parameter\")."""
        for param in params:
            if param.name == "sample_fps":
                for stream in self.streams.values():
                    stream.sample_fps = param.value
            elif param.name == "status_period_s":
                self._start_status_timer(param.value)
            elif param.name == "max_new_tokens":
                self.desk.default_max_new_tokens = param.value
            elif (spec := self.parameter_specs.get(param.name)) and spec.entry.path[0] == "session":
                path = spec.entry.path[1:]  # a live setting of the sessions
                for stream in self.streams.values():
                    owner = stream.session.config
                    for attr in path[:-1]:
                        owner = getattr(owner, attr)
                    setattr(owner, path[-1], param.value)
        self.get_logger().info("parameters set: " + ", ".join(f"{p.name}={p.value}" for p in params))

    # ---- start -------------------------------------------------------------------------

    @property
    def executor_threads(self) -> int:
        """Enough threads that every camera, every admitted question and one more request
        (answered "busy" at once), the status timer and ~/reset can run together."""
        return len(self.settings.topics) + self.settings.config.max_pending_questions + 3

    def start(self, sessions: dict[str, StreamSession]) -> None:
        """Serve: one ``CameraStream`` per camera id of ``settings`` over ``sessions[id]``."""
        config = self.settings.config
        gate = ModelGate()
        for camera_id, topic in zip(self.settings.camera_ids, self.settings.topics, strict=True):
            self.streams[camera_id] = CameraStream(
                camera_id,
                topic,
                sessions[camera_id],
                gate,
                sample_fps=config.sample_fps,
                max_frame_side=config.max_frame_side,
                now=self._now_s,
                log=self.get_logger(),
            )
        self.desk = QuestionDesk(
            self.streams,
            gate,
            policy=config.session.policy,
            max_pending=config.max_pending_questions,
            default_max_new_tokens=config.session.max_new_tokens,
            max_new_tokens_cap=int(self.parameter_specs["max_new_tokens"].high),
            log=self.get_logger(),
        )
        self._gate = gate
        if config.memory_dir:
            self.keeper = MemoryKeeper(
                self.streams, config.memory_dir, config.snapshot_period_s, self.get_logger()
            )
            self.keeper.restore()
        for stream in self.streams.values():
            self._subscribe(stream)
        text_topics = [t for t in config.text_topics or [] if t]
        for topic in text_topics:
            self._subscribe_text(topic)
        questions = ReentrantCallbackGroup()
        qos = request_qos(config.max_pending_questions)
        self.create_service(AskVideo, "~/ask", self._on_ask, qos_profile=qos, callback_group=questions)
        self.create_service(Trigger, "~/reset", self._on_reset, qos_profile=qos, callback_group=questions)
        self.create_service(Trigger, "~/save", self._on_save, qos_profile=qos, callback_group=questions)
        self._action_server = ActionServer(
            self,
            AskVideoAction,
            "~/ask_stream",
            execute_callback=self._on_ask_stream,
            goal_callback=lambda _goal: GoalResponse.ACCEPT,
            cancel_callback=lambda _goal_handle: CancelResponse.ACCEPT,
            callback_group=questions,
            goal_service_qos_profile=qos,
            result_service_qos_profile=qos,
            cancel_service_qos_profile=qos,
            result_timeout=config.action_result_timeout_s,
        )
        self._status_pub = self.create_publisher(StreamStatus, "~/status", 10)
        self._diagnostics_pub = self.create_publisher(DiagnosticArray, "/diagnostics", 10)
        self._status_group = MutuallyExclusiveCallbackGroup()
        self._status_timer = None
        self._start_status_timer(config.status_period_s)
        self.add_post_set_parameters_callback(self._apply_parameters)
        for stream in self.streams.values():
            stream.start()
        if self.keeper is not None:
            self.keeper.start()
        cameras = ", ".join(f"{s.camera_id} <- {s.topic}" for s in self.streams.values())
        self.get_logger().info(f"{READY_MARK} {config.session.policy}; cameras {cameras}")

    def _now_s(self) -> float:
        return self.get_clock().now().nanoseconds * 1e-9

    # ---- frames ------------------------------------------------------------------------

    def _subscribe(self, stream: CameraStream) -> None:
        compressed = stream.topic.rstrip("/").endswith("/compressed")
        max_pixels = self.settings.config.max_image_pixels

        def decode(msg):
            if compressed:
                return decode_compressed(msg.data, max_pixels)
            return decode_image_msg(msg, max_pixels)

        def on_frame(msg) -> None:
            try:
                stream.offer(stamp_seconds(msg.header.stamp), lambda: decode(msg))
            except Exception as error:  # a callback that raises would end the executor's spin
                stream.record_fault("receiving a frame", error)

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

    def _subscribe_text(self, topic: str) -> None:
        def on_text(msg: String) -> None:
            try:
                stamp = self._now_s()
                for stream in self.streams.values():
                    stream.offer_text(msg.data, stamp)
            except Exception as error:  # a callback that raises would end the executor's spin
                self.get_logger().error(f"text on {topic}: {type(error).__name__}: {error}")

        # Reliable: a transcript line is one message, not one of a stream of frames.
        self.create_subscription(
            String, topic, on_text, QoSProfile(depth=100), callback_group=MutuallyExclusiveCallbackGroup()
        )

    # ---- questions ---------------------------------------------------------------------

    def _on_ask(self, request: AskVideo.Request, response: AskVideo.Response) -> AskVideo.Response:
        outcome = self._answer(request, on_progress=None, cancelled=self._closing.is_set)
        response.success, response.answer, response.error = outcome.success, outcome.answer, outcome.error
        response.stats = stats_to_msg(outcome.stats)
        return response

    def _on_ask_stream(self, goal_handle) -> AskVideoAction.Result:
        def progress(stage: Stage, text: str, tokens: int) -> None:
            goal_handle.publish_feedback(
                AskVideoAction.Feedback(stage=stage.value, partial_answer=text, tokens_generated=tokens)
            )

        def cancelled() -> bool:
            return goal_handle.is_cancel_requested or self._closing.is_set()

        outcome = self._answer(goal_handle.request, on_progress=progress, cancelled=cancelled)
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

    def _answer(self, request, on_progress, cancelled: Callable[[], bool]) -> Outcome:
        try:
            question = question_of(request)
        except Exception as error:  # a request whose fields cannot be read
            stats = LatencyStats(policy=self.settings.config.session.policy)
            return Outcome(False, "", f"malformed request: {type(error).__name__}: {error}", stats)
        return self.desk.answer(question, on_progress, cancelled)

    def _on_reset(self, _request: Trigger.Request, response: Trigger.Response) -> Trigger.Response:
        with self._gate.question(self._closing.is_set) as acquired:
            if acquired:
                for stream in self.streams.values():
                    stream.reset()
        count = len(self.streams)
        response.success = acquired
        response.message = (
            f"forgot the memory of {count} stream{'s' if count != 1 else ''}"
            if acquired
            else "node is shutting down"
        )
        return response

    def _on_save(self, _request: Trigger.Request, response: Trigger.Response) -> Trigger.Response:
        if self.keeper is None:
            response.success, response.message = False, "memory_dir is not set: nothing to save"
        else:
            response.success, response.message = self.keeper.save_all()
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
        try:
            self._publish_status_once()
        except Exception as error:  # status must keep coming; say what stopped this one
            self.get_logger().error(f"publishing status failed: {type(error).__name__}: {error}")

    def _publish_status_once(self) -> None:
        now_msg = self.get_clock().now().to_msg()
        diagnostics = DiagnosticArray()
        diagnostics.header.stamp = now_msg
        pending = self.desk.pending
        for stream in self.streams.values():
            snap = stream.snapshot()
            c, m = snap.counters, snap.memory
            saved = self.keeper.state(stream.camera_id) if self.keeper is not None else None
            status = StreamStatus(
                stream_id=stream.camera_id,
                topic=stream.topic,
                frames_received=c.received,
                frames_sampled=c.sampled,
                frames_ingested=c.ingested,
                frames_dropped_busy=c.dropped_busy,
                frames_dropped_invalid=c.dropped_invalid,
                faults=c.faults,
                texts_ingested=c.texts_ingested,
                texts_dropped=c.texts_dropped,
                ingest_lag_ms=c.ingest_lag_ms,
                ingest_ms_mean=m.ingest_ms_mean,
                stream_seconds=m.stream_seconds,
                tokens_in_memory=m.tokens_in_memory,
                host_kv_bytes=m.host_kv_bytes,
                device_kv_bytes=m.device_kv_bytes,
                disk_kv_bytes=m.disk_kv_bytes,
                clusters_in_memory=m.clusters_in_memory,
                tokens_evicted=m.tokens_evicted,
                policy=m.policy,
                snapshot_age_s=saved.age_s if saved is not None else -1.0,
                snapshot_bytes=saved.snapshot_bytes if saved is not None else 0,
            )
            status.header.stamp = now_msg
            status.header.frame_id = stream.camera_id
            self._status_pub.publish(status)
            diagnostics.status.append(self._diagnose(stream, c, m, pending, saved))
        self._diagnostics_pub.publish(diagnostics)

    def _diagnose(self, stream: CameraStream, c, m, pending: int, saved) -> DiagnosticStatus:
        """One camera's health: rates over the last period, drops, failures, lag, memory and
        its last snapshot (``saved``: a ``SnapshotState``, None without ``memory_dir``)."""
        now = time.monotonic()
        then, before = self._last_report.get(stream.camera_id, (now, c))
        self._last_report[stream.camera_id] = (now, c)
        elapsed = now - then

        def rate(field: str) -> float:
            return (getattr(c, field) - getattr(before, field)) / elapsed if elapsed > 0 else 0.0

        sampled = c.sampled - before.sampled
        busy = c.dropped_busy - before.dropped_busy
        invalid = c.dropped_invalid - before.dropped_invalid
        failed = c.faults - before.faults
        problems = []
        if sampled and busy / sampled > HEAVY_DROP_SHARE:
            problems.append(f"dropping {busy} of {sampled} sampled frames (model busy)")
        if invalid:
            problems.append(f"{invalid} invalid frames")
        if c.ingested and c.ingest_lag_ms > LAG_WARN_S * 1e3:
            problems.append(f"ingest lags {c.ingest_lag_ms / 1e3:.1f} s behind frame stamps")
        if c.ingested and c.stamp_ahead_ms > LAG_WARN_S * 1e3:
            problems.append(f"frame stamps run {c.stamp_ahead_ms / 1e3:.1f} s ahead of the node clock")
        if saved is not None and saved.error:
            problems.append(f"snapshot failed: {saved.error}")
        if failed:
            level, message = (
                DiagnosticStatus.ERROR,
                "; ".join([f"{failed} failures, last: {c.last_error}", *problems]),
            )
        elif problems:
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
            "faults": c.faults,
            "texts_ingested": c.texts_ingested,
            "texts_dropped": c.texts_dropped,
            "last_error": c.last_error,
            "ingest_lag_ms": f"{c.ingest_lag_ms:.1f}",
            "ingest_ms_mean": f"{m.ingest_ms_mean:.1f}",
            "stream_seconds": f"{m.stream_seconds:.1f}",
            "tokens_in_memory": m.tokens_in_memory,
            "host_kv_bytes": m.host_kv_bytes,
            "device_kv_bytes": m.device_kv_bytes,
            "disk_kv_bytes": m.disk_kv_bytes,
            "questions_pending": pending,
            "policy": m.policy,
        }
        if saved is not None:
            values["snapshot_age_s"] = f"{saved.age_s:.1f}"
            values["snapshot_bytes"] = saved.snapshot_bytes
        return DiagnosticStatus(
            level=level,
            name=f"{self.get_name()}: camera {stream.camera_id}",
            message=message,
            hardware_id=stream.topic,
            values=[KeyValue(key=k, value=str(v)) for k, v in values.items()],
        )

    # ---- shutdown ----------------------------------------------------------------------

    @property
    def pending_questions(self) -> int:
        return self.desk.pending if self.streams else 0

    def close(self) -> None:
        """Cancel answers in flight, stop the ingest workers, then snapshot the memory (``memory_dir``)."""
        self._closing.set()
        for stream in self.streams.values():
            stream.stop()
        if self.keeper is not None:
            self.keeper.close()
