"""The stream node over real DDS: a node process, two bag players (from a real video) and
this test as client.

One node serves the whole module: camera ``front`` (sensor_msgs/Image, 40 frames at 5 fps)
and camera ``side`` (CompressedImage, 20 frames), both replayed from bags, sampled at
2.5 fps, on simulated time from the front bag's /clock. Its camera subscriptions are made
reliable through QoS overrides, so that every frame is counted (test_node_faults feeds the
default best-effort ones).
"""

from __future__ import annotations

import itertools
import json
import signal
import subprocess
import sys
import threading
import uuid
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import rclpy
from action_msgs.msg import GoalStatus
from diagnostic_msgs.msg import DiagnosticArray, DiagnosticStatus
from helpers import ListLog, assert_documented, wait_for
from mosaic_ros.action import AskVideo as AskVideoAction
from mosaic_ros.srv import AskVideo
from rcl_interfaces.msg import ParameterType
from rclpy.context import Context
from rclpy.exceptions import ParameterException
from rclpy.parameter import Parameter
from rclpy.parameter_client import AsyncParameterClient

from mosaic_ros.nodes import stream_main, stream_params
from mosaic_ros.nodes.ask_client import AskClient, make_request
from mosaic_ros.nodes.bag_tool import BagSummary, video_to_bag
from mosaic_ros.nodes.camera_stream import (
    TEXT_QUEUE,
    CameraStream,
    Frame,
    FrameClock,
    LatestFrameSlot,
    ModelGate,
    StampRefused,
)
from mosaic_ros.nodes.demo import default_video
from mosaic_ros.nodes.image_codec import ImageDecodeError
from mosaic_ros.nodes.processes import READY_MARK, ModuleProcess, start_stream_node
from mosaic_ros.nodes.sampling import FrameSampler
from mosaic_ros.nodes.stream_main import ros_arguments
from mosaic_ros.nodes.stream_node import StreamNode, camera_ids_for
from mosaic_ros.nodes.stream_params import (
    STANDARD_PARAMETERS,
    NodeConfig,
    policy_option_parameters,
)
from mosaic_ros.runtime import config
from mosaic_ros.runtime.bench.runner import BenchConfig
from mosaic_ros.runtime.config import nested, setting, strict
from mosaic_ros.runtime.kv.policy import PolicyConfig
from mosaic_ros.runtime.session import SessionConfig, SessionError, SessionStatus
from mosaic_ros.runtime.stats import LatencyStats

FRONT_TOPIC = "/front/image_raw"
SIDE_TOPIC = "/side/image_raw/compressed"
BAG_START_S = 1_000_000.0  # header stamps far from the wall clock: lag is small only on sim time
SAMPLE_FPS = 2.5  # half the bags' 5 fps: every second frame
MAX_NEW_TOKENS = 8
TIMEOUT_S = 120.0
CONFIG_FILE = Path(__file__).resolve().parent.parent / "config" / "stream.yaml"


@dataclass
class Stream:
    node: ModuleProcess
    client: AskClient
    front: BagSummary
    side: BagSummary
    published: dict[str, int]
    preamble_tokens: dict[str, int]


def published_counts(output: str) -> dict[str, int]:
    """``published N messages on TOPIC`` lines of a player."""
    counts = {}
    for line in output.splitlines():
        if line.startswith("published "):
            words = line.split()
            counts[words[-1]] = int(words[1])
    return counts


@pytest.fixture(scope="module")
def ros_module_context():
    context = Context()
    rclpy.init(context=context)
    yield context
    context.try_shutdown()


@pytest.fixture(scope="module")
def stream(tmp_path_factory, ros_module_context) -> Stream:
    work = tmp_path_factory.mktemp("stream_node")
    video = default_video(work)
    common = dict(fps=5.0, max_side=160, start_time=BAG_START_S)
    front = video_to_bag(video, work / "front", topic=FRONT_TOPIC, max_frames=40, frame_id="front", **common)
    side = video_to_bag(
        video, work / "side", topic=SIDE_TOPIC, max_frames=20, compressed=True, frame_id="side", **common
    )
    params = {
        "camera_topics": [FRONT_TOPIC, SIDE_TOPIC],
        "sample_fps": SAMPLE_FPS,
        "max_frame_side": 160,
        "policy": "dense",
        "max_new_tokens": MAX_NEW_TOKENS,
        "status_period_s": 0.3,
        "use_sim_time": True,
        # Reliable and queued, so that no frame of the bag is lost before the subscription has
        # matched the player (which waits for its reliable subscribers to acknowledge every
        # frame) or while callbacks wait for a busy CPU.
        "qos_overrides": {
            topic: {"subscription": {"reliability": "reliable", "depth": 100}}
            for topic in (FRONT_TOPIC, SIDE_TOPIC)
        },
    }
    node = start_stream_node(params, work)
    client = AskClient(
        "/mosaic_stream", name=f"test_client_{uuid.uuid4().hex[:8]}", context=ros_module_context
    )
    players: list[ModuleProcess] = []
    try:
        node.wait_for_output(READY_MARK, TIMEOUT_S)
        assert client.spin_until(lambda: {"front", "side"} <= set(client.status), TIMEOUT_S), "no status"
        preamble = {name: msg.tokens_in_memory for name, msg in client.status.items()}
        for summary, extra in ((front, ["--clock"]), (side, [])):
            args = ["play", str(summary.path), "--rate", "2", "--wait-subscribers", "1", *extra]
            players.append(ModuleProcess("bag_tool", args, work, name=f"player_{summary.path.name}"))
        published: dict[str, int] = {}
        for player in players:
            assert player.wait(TIMEOUT_S) == 0, player.stderr()
            published.update(published_counts(player.stdout()))
        client.status.clear()

        def settled() -> bool:
            statuses = [client.status.get(name) for name in ("front", "side")]
            return all(
                s is not None
                and s.frames_received == published[s.topic]
                and s.frames_ingested + s.frames_dropped_busy + s.frames_dropped_invalid == s.frames_sampled
                for s in statuses
            )

        assert client.spin_until(settled, TIMEOUT_S), f"streams did not settle: {client.status}"
        yield Stream(node, client, front, side, published, preamble)
    finally:
        for player in players:
            player.stop()
        client.close()
        assert node.stop() == 0, node.stderr()
        assert "Traceback" not in node.stderr()


def ask(client: AskClient, question: str, **kwargs) -> AskVideo.Response:
    return client.ask(make_request(question, **kwargs), TIMEOUT_S)


def fresh_status(client: AskClient, camera: str):
    client.status.pop(camera, None)
    assert client.spin_until(lambda: camera in client.status, TIMEOUT_S)
    return client.status[camera]


# ---- pure helpers of the node ---------------------------------------------------------


def test_camera_ids_derive_from_topics_or_come_from_the_parameter():
    assert camera_ids_for([FRONT_TOPIC, SIDE_TOPIC], None) == ["front", "side"]
    assert camera_ids_for(["/a/cam/image_raw", "/b/cam/image_raw"], []) == ["a_cam", "b_cam"]
    assert camera_ids_for(["/image_raw", "/image_raw/compressed"], None) == ["image_raw", "image_raw_2"]
    assert camera_ids_for(["/x", "/y"], ["left", "right"]) == ["left", "right"]
    with pytest.raises(ValueError, match="camera_ids has 1 names for 2 camera_topics"):
        camera_ids_for(["/x", "/y"], ["left"])
    with pytest.raises(ValueError, match="distinct"):
        camera_ids_for(["/x", "/y"], ["left", "left"])


def test_params_file_option_becomes_ros_arguments_before_the_users():
    argv = ["prog", "--params", "a.yaml", "--ros-args", "-p", "model:=m"]
    assert ros_arguments(argv) == [
        "prog", "--ros-args", "--params-file", "a.yaml", "--", "--ros-args", "-p", "model:=m",
    ]  # fmt: skip
    assert ros_arguments(["prog", "--ros-args", "-p", "x:=1"]) == ["prog", "--ros-args", "-p", "x:=1"]


def test_ctrl_c_that_an_extension_turns_into_an_import_error_still_exits_cleanly(monkeypatch):
    """A SIGINT striking while rclpy's C extension initialises comes back as its ImportError
    ("initialization failed"), the KeyboardInterrupt as the cause: status 0 like any Ctrl-C at
    startup; an ImportError that no signal caused still ends the process with its traceback."""

    def interrupted_import(argv, interrupts):
        try:
            raise KeyboardInterrupt
        except KeyboardInterrupt as stop:
            raise ImportError("initialization failed") from stop

    def missing_library(argv, interrupts):
        raise ImportError("libfoo.so: cannot open shared object file")

    codes = []
    monkeypatch.setattr(signal, "signal", lambda signum, handler: None)  # keep pytest's handlers
    monkeypatch.setattr(stream_main, "_exit_now", codes.append)
    monkeypatch.setattr(stream_main, "_run", interrupted_import)
    stream_main.main(["prog"])
    assert codes == [0]
    monkeypatch.setattr(stream_main, "_run", missing_library)
    with pytest.raises(ImportError, match="libfoo"):
        stream_main.main(["prog"])
    assert codes == [0]


def test_interrupted_follows_causes_and_contexts():
    try:
        try:
            raise KeyboardInterrupt
        except KeyboardInterrupt:
            raise RuntimeError("rcl_init failed")  # noqa: B904 - the implicit context is the point
    except RuntimeError as error:
        assert stream_main.interrupted(error)
    assert not stream_main.interrupted(RuntimeError("rcl_init failed"))
    assert stream_main.interrupted(KeyboardInterrupt())


def test_sampler_keeps_one_frame_per_interval_from_the_first_kept():
    sampler = FrameSampler(4.0)
    kept = []
    for i in range(11):  # a 10 fps source, 0.0 .. 1.0 s
        stamp = 50.0 + i / 10
        if sampler.is_due(stamp):
            sampler.commit(stamp)
            kept.append(i)
    assert kept == [0, 3, 5, 8, 10]


def test_slot_keeps_the_newest_frame_and_its_pending_reset():
    slot = LatestFrameSlot()
    assert slot.put(Frame(np.zeros((1, 1, 3), np.uint8), 1.0, reset_before=True)) is False
    assert slot.put(Frame(np.ones((1, 1, 3), np.uint8), 2.0)) is True
    frame = slot.take(timeout=0.0)
    assert (frame.stamp, frame.reset_before) == (2.0, True)
    assert slot.take(timeout=0.0) is None


def test_gate_serves_questions_in_arrival_order_before_frames():
    gate = ModelGate()
    order: list[str] = []

    def use(kind: str, name: str) -> None:
        with getattr(gate, kind)(lambda: False) as acquired:
            assert acquired
            order.append(name)

    threads = [threading.Thread(target=use, args=args) for args in (("frame", "frame"), ("question", "q1"))]
    threads.append(threading.Thread(target=use, args=("question", "q2")))
    with gate.question(lambda: False):
        threads[0].start()
        threads[1].start()
        wait_for(lambda: gate.questions_waiting == 1, 5, "q1 waiting")
        threads[2].start()
        wait_for(lambda: gate.questions_waiting == 2, 5, "q2 waiting")
    for thread in threads:
        thread.join(5)
    assert order == ["q1", "q2", "frame"]


def test_gate_serves_frames_in_arrival_order_so_a_stream_asking_again_cannot_starve_another():
    """A stream with queued text events asks for the model again the moment it lets go; a
    stream already waiting goes first."""
    gate = ModelGate()
    order: list[str] = []

    def other() -> None:
        with gate.frame(lambda: False) as acquired:
            assert acquired
            order.append("other")

    thread = threading.Thread(target=other)
    with gate.frame(lambda: False):
        thread.start()
        wait_for(lambda: gate.frames_waiting == 1, 5, "the other stream waiting")
    with gate.frame(lambda: False) as acquired:  # at once, as a text queue does
        assert acquired
        order.append("again")
    thread.join(5)
    assert order == ["other", "again"]


class FakeSession:
    """Records what a CameraStream does with its session."""

    def __init__(self):
        self.calls: list[tuple] = []
        self.last_stamp = None

    def ingest(self, frame, stamp, channel_order):
        self.calls.append(("ingest", stamp))

    def reset(self):
        self.calls.append(("reset",))

    def add_text(self, text, stamp):
        if not text.strip():
            raise SessionError("text event is empty")
        self.calls.append(("text", text, stamp))

    def status(self):
        return SessionStatus("dense", 0, 0, 0, 0, 0, 0, None, None, 0.0)


def offer_and_wait(stream: CameraStream, stamp: float, decode) -> None:
    """Offer one frame and wait until the stream has dealt with it (ingested, refused or failed)."""

    def handled() -> bool:
        c = stream.snapshot().counters
        return c.ingested + c.dropped_invalid + c.faults == c.received

    stream.offer(stamp, decode)
    wait_for(handled, 5, f"frame at {stamp} handled")


def run_frames(session, offers, now=lambda: 0.0) -> tuple[CameraStream, ListLog]:
    """A started CameraStream over ``session`` offered each of ``offers`` in turn (a stamp, or a
    (stamp, decode) pair; a blank 4x4 frame by default), each handled before the next; stopped."""
    log = ListLog()
    stream = CameraStream("cam", "/cam", session, ModelGate(), 100.0, 0, now=now, log=log)
    stream.start()
    blank = np.zeros((4, 4, 3), np.uint8)
    try:
        for offer in offers:
            stamp, decode = offer if isinstance(offer, tuple) else (offer, lambda: blank)
            offer_and_wait(stream, stamp, decode)
    finally:
        stream.stop()
    return stream, log


def test_negative_and_non_finite_stamps_are_refused_before_they_can_reset_the_stream():
    session = FakeSession()
    stream, log = run_frames(session, (10.0, -1.0, float("nan"), float("-inf"), 11.0))
    assert session.calls == [("ingest", 10.0), ("ingest", 11.0)]  # no reset: the memory is kept
    assert stream.snapshot().counters.dropped_invalid == 3
    assert "dropping invalid frame on /cam: frame stamp -1.0 s is not a finite time >= 0" in log.lines[0]


@pytest.mark.parametrize("stamps", [(-1.0,), (float("nan"),), (3.0, 0.0)])
def test_frame_clock_refusals_are_the_documented_ones(stamps):
    clock = FrameClock(lambda: 99.0)
    for stamp in stamps[:-1]:
        clock.time_of(stamp)
    with pytest.raises(StampRefused) as refused:
        clock.time_of(stamps[-1])
    assert_documented(str(refused.value))


def test_an_unstamped_frame_in_a_stamped_stream_is_refused_not_given_the_receipt_time():
    """The receipt time (node clock, here 500 s) would put the frame after the next camera stamp,
    which would then look like a jump back and wipe the memory."""
    session = FakeSession()
    stream, log = run_frames(session, (10.0, 0.0, 11.0), now=lambda: 500.0)
    assert session.calls == [("ingest", 10.0), ("ingest", 11.0)]
    assert stream.snapshot().counters.dropped_invalid == 1
    assert "frame has no header stamp (0) on a stream whose frames are stamped" in log.lines[0]


def test_a_stream_of_unstamped_frames_uses_their_time_of_receipt():
    session = FakeSession()
    clock = iter([100.0, 100.5, 101.0, 101.5, 102.0, 102.5])
    _, log = run_frames(session, (0.0, 0.0), now=lambda: next(clock))
    stamps = [call[1] for call in session.calls]
    assert stamps[0] == 100.0 and stamps[1] > stamps[0]
    assert any("frames carry no header stamp; using their time of receipt" in line for line in log.lines)


def test_the_worker_survives_any_failure_and_reports_it():
    class FailingOnce(FakeSession):
        def ingest(self, frame, stamp, channel_order):
            if stamp == 2.0:
                raise KeyError("not an input error: a bug")
            super().ingest(frame, stamp, channel_order)

    session = FailingOnce()
    stream, log = run_frames(session, (1.0, 2.0, 3.0))
    counters = stream.snapshot().counters
    assert (counters.ingested, counters.faults) == (2, 1)
    assert counters.last_error == "ingesting the frame at 2.000 s: KeyError: 'not an input error: a bug'"
    assert session.calls == [("ingest", 1.0), ("ingest", 3.0)]
    assert any("Traceback" in line for line in log.lines)


def test_a_decoder_that_raises_anything_counts_an_invalid_frame():
    def decoder_bug():
        raise MemoryError("cannot allocate")

    session = FakeSession()
    stream, log = run_frames(session, ((1.0, decoder_bug), 2.0))
    assert stream.snapshot().counters.dropped_invalid == 1
    assert "could not be decoded (MemoryError: cannot allocate)" in log.lines[0]
    assert session.calls == [("ingest", 2.0)]


def test_a_dropped_frame_text_or_fault_is_logged_before_a_status_can_count_it():
    """Each line is written while the counters still show the event uncounted: a status published
    between the two steps (the node's timer runs on another thread) never shows a count whose
    log line is not there yet."""

    class FailingAt3(FakeSession):
        def ingest(self, frame, stamp, channel_order):
            if stamp == 3.0:
                raise KeyError("a bug")
            super().ingest(frame, stamp, channel_order)

    class CountersAtEachLine(ListLog):
        stream: CameraStream | None = None

        def __init__(self):
            super().__init__()
            self.counters = []

        def info(self, text):
            super().info(text)
            self.counters.append(self.stream.snapshot().counters)

        warning = error = info

    log = CountersAtEachLine()
    stream = CameraStream("cam", "/cam", FailingAt3(), ModelGate(), 100.0, 0, now=lambda: 0.0, log=log)
    log.stream = stream
    blank = np.zeros((4, 4, 3), np.uint8)
    stream.start()
    try:
        offer_and_wait(stream, -1.0, lambda: blank)
        offer_and_wait(stream, 3.0, lambda: blank)
        stream.offer_text("  ", 4.0)
        wait_for(lambda: stream.snapshot().counters.texts_dropped == 1, 5, "the empty note dropped")
    finally:
        stream.stop()

    def counters_at(text: str):
        return next(c for line, c in zip(log.lines, log.counters, strict=True) if text in line)

    assert counters_at("dropping invalid frame on /cam").dropped_invalid == 0
    fault = counters_at("ingesting the frame at 3.000 s failed")
    assert (fault.faults, fault.last_error) == (0, "")
    assert counters_at("dropping a text event").texts_dropped == 0
    final = stream.snapshot().counters
    assert (final.dropped_invalid, final.faults, final.texts_dropped) == (1, 1, 1)


def test_text_events_are_ingested_by_the_worker_in_order_and_bad_ones_counted():
    session, log = FakeSession(), ListLog()
    stream = CameraStream("cam", "/cam", session, ModelGate(), 100.0, 0, now=lambda: 0.0, log=log)
    stream.start()
    try:
        stream.offer_text("first note", 5.0)
        stream.offer_text("  ", 5.5)
        stream.offer_text("second note", 6.0)
        wait_for(
            lambda: stream.snapshot().counters.texts_ingested + stream.snapshot().counters.texts_dropped == 3,
            5,
            "three text events handled",
        )
    finally:
        stream.stop()
    assert session.calls == [("text", "first note", 5.0), ("text", "second note", 6.0)]
    assert (stream.snapshot().counters.texts_ingested, stream.snapshot().counters.texts_dropped) == (2, 1)
    assert "camera 'cam': dropping a text event: text event is empty" in log.lines


def test_text_events_beyond_the_queue_drop_the_oldest_while_the_model_is_busy():
    session, log = FakeSession(), ListLog()
    gate = ModelGate()
    stream = CameraStream("cam", "/cam", session, gate, 100.0, 0, now=lambda: 0.0, log=log)
    stream.start()
    try:
        with gate.question(lambda: False):  # the model answers a question: the worker must wait
            for i in range(TEXT_QUEUE + 3):
                stream.offer_text(f"note {i}", float(i))
            assert stream.snapshot().counters.texts_dropped == 3
        wait_for(lambda: stream.snapshot().counters.texts_ingested == TEXT_QUEUE, 10, "the queue ingested")
    finally:
        stream.stop()
    assert [c[1] for c in session.calls] == [f"note {i}" for i in range(3, TEXT_QUEUE + 3)]


def test_no_status_shows_a_frame_or_note_counted_without_the_memory_it_made():
    """The counts and the memory figures of a stream's status change together: a status read
    while the worker re-reads the memory (here: from inside ``status``) shows neither yet."""

    class CountingSession(FakeSession):
        """One token of memory per frame or text event; ``status`` records the stream's view."""

        def __init__(self):
            super().__init__()
            self.tokens = 0
            self.seen: list[tuple[int, int]] = []  # (frames + texts counted, tokens shown)

        def ingest(self, frame, stamp, channel_order):
            super().ingest(frame, stamp, channel_order)
            self.tokens += 1

        def add_text(self, text, stamp):
            super().add_text(text, stamp)
            self.tokens += 1

        def status(self):
            if stream is not None:
                snap = stream.snapshot()
                self.seen.append(
                    (snap.counters.ingested + snap.counters.texts_ingested, snap.memory.tokens_in_memory)
                )
            return SessionStatus("dense", 0, self.tokens, 0, 0, 0, 0, None, None, 0.0)

    stream = None
    session, log = CountingSession(), ListLog()
    stream = CameraStream("cam", "/cam", session, ModelGate(), 100.0, 0, now=lambda: 0.0, log=log)
    stream.start()
    try:
        blank = np.zeros((4, 4, 3), np.uint8)
        for stamp in (1.0, 2.0):
            offer_and_wait(stream, stamp, lambda: blank)
            stream.offer_text(f"note at {stamp}", stamp + 0.5)
            wait_for(lambda s=stamp: stream.snapshot().counters.texts_ingested == s, 5, f"note at {stamp}")
    finally:
        stream.stop()
    final = stream.snapshot()
    assert (final.counters.ingested, final.counters.texts_ingested, final.memory.tokens_in_memory) == (
        2,
        2,
        4,
    )
    assert len(session.seen) >= 4  # at least once per frame and note
    assert all(counted == shown for counted, shown in session.seen), session.seen


def test_time_jump_resets_the_stream_before_the_next_valid_frame():
    session, log = FakeSession(), ListLog()
    stream = CameraStream("cam", "/cam", session, ModelGate(), 100.0, 0, now=lambda: 0.0, log=log)
    stream.start()
    try:
        frame = np.zeros((4, 4, 3), np.uint8)

        def bad():
            raise ImageDecodeError("broken")

        for stamp, decode in ((10.0, lambda: frame), (11.0, lambda: frame), (5.0, bad), (6.0, lambda: frame)):
            stream.offer(stamp, decode)
            wait_for(
                lambda: (
                    stream.snapshot().counters.ingested + stream.snapshot().counters.dropped_invalid
                    == stream.snapshot().counters.received
                ),
                5,
                f"frame at {stamp} handled",
            )
    finally:
        stream.stop()
    assert session.calls == [("ingest", 10.0), ("ingest", 11.0), ("reset",), ("ingest", 6.0)]
    assert any("time jumped back to 5.000 s" in line for line in log.lines)
    assert stream.snapshot().counters.dropped_invalid == 1


# ---- over DDS --------------------------------------------------------------------------


@pytest.mark.ros
def test_stream_status_counts_agree_with_the_bags(stream):
    front, side = fresh_status(stream.client, "front"), fresh_status(stream.client, "side")
    for status, bag in ((front, stream.front), (side, stream.side)):
        assert stream.published[bag.topic] == bag.frames
        assert status.frames_received == bag.frames
        # 5 fps stamps sampled at 2.5 fps: frames 0, 2, 4, ...
        assert status.frames_sampled == len(range(0, bag.frames, 2))
        assert status.frames_ingested + status.frames_dropped_busy == status.frames_sampled
        assert status.frames_ingested > 0
        assert status.frames_dropped_invalid == 0
        assert status.policy == "dense"
        assert status.tokens_in_memory > stream.preamble_tokens[status.stream_id]
        assert 0.0 < status.stream_seconds <= (bag.frames - 1) / 5.0 + 1e-6
        # Stamps are 1e6 s after the epoch: only on the bag's /clock is the lag this small.
        assert abs(status.ingest_lag_ms) < 5000.0
        assert status.ingest_ms_mean > 0.0
    assert (front.topic, side.topic) == (FRONT_TOPIC, SIDE_TOPIC)
    assert front.header.frame_id == "front"


@pytest.mark.ros
def test_answer_carries_every_latency_field(stream):
    front = fresh_status(stream.client, "front")
    response = ask(stream.client, "What are the people doing?")
    assert response.success, response.error
    assert response.error == ""
    stats = response.stats
    assert set(stats.get_fields_and_field_types()) == set(LatencyStats.field_names())
    assert stats.policy == "dense"
    assert stats.tokens_generated <= MAX_NEW_TOKENS  # random weights may end an answer at any token
    assert stats.frames_in_memory == front.frames_ingested
    assert stats.tokens_in_memory >= front.tokens_in_memory
    assert stats.tokens_retrieved > 0
    assert stats.device_kv_bytes > 0
    assert stats.prefill_ms > 0 and stats.decode_ms >= 0 and stats.ttft_ms > 0 and stats.queue_ms >= 0
    assert stats.total_ms >= stats.queue_ms + stats.prefill_ms + stats.decode_ms
    assert stats.total_ms >= stats.ttft_ms >= stats.queue_ms


@pytest.mark.ros
def test_questions_go_to_the_stream_named_by_camera_id(stream):
    side = fresh_status(stream.client, "side")
    front = fresh_status(stream.client, "front")
    assert side.frames_ingested != front.frames_ingested
    by_side = ask(stream.client, "What is in view?", camera="side")
    by_default = ask(stream.client, "What is in view?")
    assert by_side.success and by_default.success
    assert by_side.stats.frames_in_memory == side.frames_ingested
    assert by_default.stats.frames_in_memory == front.frames_ingested
    unknown = ask(stream.client, "What is in view?", camera="rear")
    assert not unknown.success
    assert unknown.error == "unknown camera_id 'rear'; known: front, side"


@pytest.mark.ros
def test_time_windows_are_checked_and_applied(stream):
    recent = ask(stream.client, "What happened just now?", window_seconds=2.0)
    assert recent.success, recent.error
    request = make_request("What happened then?")
    request.window_start.sec, request.window_end.sec = int(BAG_START_S) + 3, int(BAG_START_S) + 1
    inverted = stream.client.ask(request, TIMEOUT_S)
    assert not inverted.success
    assert inverted.error.startswith("invalid time window")
    request.window_start.sec, request.window_end.sec = int(BAG_START_S), int(BAG_START_S) + 3
    absolute = stream.client.ask(request, TIMEOUT_S)
    assert absolute.success, absolute.error
    request.window_seconds = 2.0
    both = stream.client.ask(request, TIMEOUT_S)
    assert both.error == "give either window_seconds or window_start/window_end, not both"
    negative = ask(stream.client, "What?", window_seconds=-1.0)
    assert negative.error == "window_seconds must be >= 0, got -1.0"


@pytest.mark.ros
def test_action_streams_tokens_as_feedback_and_finishes(stream):
    feedback: list[AskVideoAction.Feedback] = []
    goal = make_request("Describe the scene.", request_type=AskVideoAction.Goal)
    status, result = stream.client.ask_stream(goal, TIMEOUT_S, on_feedback=feedback.append)
    assert status == GoalStatus.STATUS_SUCCEEDED
    assert result.success, result.error
    # Feedback and result travel on different topics: the last feedback may come after.
    assert stream.client.spin_until(lambda: feedback and feedback[-1].stage == "done", TIMEOUT_S)
    stages = [f.stage for f in feedback]
    assert stages[:2] == ["queued", "retrieving"]
    assert stages[-1] == "done"
    generating = [f for f in feedback if f.stage == "generating"]
    assert [f.tokens_generated for f in generating] == list(range(1, len(generating) + 1))
    assert len(generating) == result.stats.tokens_generated
    assert all(b.partial_answer.startswith(a.partial_answer) for a, b in itertools.pairwise(generating))
    assert feedback[-1].partial_answer == result.answer
    assert "".join(f.partial_answer for f in generating[-1:]).strip() == result.answer


@pytest.mark.ros
def test_action_cancel_returns_the_partial_answer(stream):
    # Random weights may end an answer at any token: ask until one is still going at 5 tokens.
    for take in range(10):
        generated: list[AskVideoAction.Feedback] = []

        def on_feedback(msg, generated=generated) -> None:
            if msg.stage == "generating":
                generated.append(msg)

        goal = make_request(
            f"Describe everything, take {take}.", max_new_tokens=4000, request_type=AskVideoAction.Goal
        )
        status, result = stream.client.ask_stream(
            goal,
            TIMEOUT_S,
            on_feedback=on_feedback,
            cancel_when=lambda generated=generated: len(generated) >= 5,
        )
        if status != GoalStatus.STATUS_SUCCEEDED:
            break
    assert status == GoalStatus.STATUS_CANCELED
    assert not result.success
    assert result.error == "cancelled"
    assert 5 <= result.stats.tokens_generated < 4000
    # Feedback may still be on its way; what arrived is the start of the partial answer.
    assert result.answer.startswith(generated[-1].partial_answer.strip())
    assert ask(stream.client, "Still there?").success


@pytest.mark.ros
def test_diagnostics_report_each_camera(stream):
    arrays: list[DiagnosticArray] = []
    subscription = stream.client.create_subscription(DiagnosticArray, "/diagnostics", arrays.append, 10)
    try:
        assert stream.client.spin_until(lambda: arrays, TIMEOUT_S), "no /diagnostics"
    finally:
        stream.client.destroy_subscription(subscription)
    by_name = {s.name: s for s in arrays[-1].status}
    assert set(by_name) == {"mosaic_stream: camera front", "mosaic_stream: camera side"}
    front = by_name["mosaic_stream: camera front"]
    values = {kv.key: kv.value for kv in front.values}
    assert front.hardware_id == FRONT_TOPIC
    assert values["frames_received"] == str(stream.front.frames)
    assert values["frames_dropped_invalid"] == "0"
    assert int(values["tokens_in_memory"]) > 0
    assert front.level == DiagnosticStatus.OK, front.message


@pytest.mark.ros
def test_node_declares_exactly_the_documented_parameters(stream):
    parameters = AsyncParameterClient(stream.client, "/mosaic_stream")
    assert parameters.wait_for_services(timeout_sec=TIMEOUT_S)
    listed = parameters.list_parameters()
    assert stream.client.spin_until(listed.done, TIMEOUT_S)
    declared = set(listed.result().result.names)
    expected = set(stream_params.parameters()) | set(STANDARD_PARAMETERS)
    # the dense policy's options, derived from the policy: its own and the common ones
    options = {spec.name for spec in policy_option_parameters("dense")}
    assert "policy_options.reserve_tokens" in options and "policy_options.page_rows" in options
    expected |= options
    assert expected <= declared
    others = {name for name in declared - expected if not name.startswith("qos_overrides.")}
    assert others <= {"start_type_description_service"}
    assert f"qos_overrides.{FRONT_TOPIC}.subscription.reliability" in declared


@pytest.mark.ros
def test_camera_subscriptions_take_qos_overrides(stream):
    from rclpy.qos import ReliabilityPolicy

    (front,) = [
        e
        for e in stream.client.get_subscriptions_info_by_topic(FRONT_TOPIC)
        if e.node_name == "mosaic_stream"
    ]
    assert front.qos_profile.reliability == ReliabilityPolicy.RELIABLE


@pytest.mark.ros
def test_parameters_refuse_read_only_changes_and_apply_live_ones(stream):
    parameters = AsyncParameterClient(stream.client, "/mosaic_stream")
    assert parameters.wait_for_services(timeout_sec=TIMEOUT_S)

    def set_one(name: str, value) -> object:
        future = parameters.set_parameters([Parameter(name, value=value)])
        assert stream.client.spin_until(future.done, TIMEOUT_S)
        return future.result().results[0]

    for name, value in (("model", "tiny-random:llava-ov"), ("policy", "window"), ("camera_topics", ["/x"])):
        refused = set_one(name, value)
        assert not refused.successful
        assert refused.reason == f"Trying to set a read-only parameter: {name}."
    out_of_range = set_one("sample_fps", 0.0)
    assert not out_of_range.successful
    assert set_one("max_question_chars", 12).successful
    try:
        too_long = ask(stream.client, "What is happening?")
        assert too_long.error == "question has 18 characters; the limit is 12"
        assert ask(stream.client, "What is it?").success
    finally:
        assert set_one("max_question_chars", 2000).successful
    assert set_one("status_period_s", 0.2).successful
    assert fresh_status(stream.client, "front").frames_received == stream.front.frames


def run_ask_cli(*args: str) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "mosaic_ros.nodes.ask_client", *args]
    return subprocess.run(command, capture_output=True, text=True, timeout=TIMEOUT_S)


@pytest.mark.ros
def test_ask_client_cli_prints_the_answer_and_fails_clearly(stream):
    ok = run_ask_cli("What do you see?", "--json", "--max-new-tokens", "3")
    assert ok.returncode == 0, ok.stderr
    answer = json.loads(ok.stdout)
    assert answer["success"] and answer["error"] == ""
    assert list(answer["stats"]) == LatencyStats.field_names()
    assert answer["stats"]["tokens_generated"] <= 3
    table = run_ask_cli("Anyone?", "--camera", "side", "--stream-tokens")
    assert table.returncode == 0, table.stderr
    assert "total_ms" in table.stdout and "tokens_generated" in table.stdout
    failed = run_ask_cli("Where?", "--camera", "rear")
    assert failed.returncode == 1
    assert "unknown camera_id 'rear'; known: front, side" in failed.stderr


@pytest.mark.ros
def test_reset_forgets_every_stream(stream):
    from std_srvs.srv import Trigger

    reset = stream.client.create_client(Trigger, "/mosaic_stream/reset")
    assert reset.wait_for_service(timeout_sec=TIMEOUT_S)
    future = reset.call_async(Trigger.Request())
    assert stream.client.spin_until(future.done, TIMEOUT_S)
    assert future.result().success, future.result().message
    for camera in ("front", "side"):
        status = fresh_status(stream.client, camera)
        assert status.tokens_in_memory == stream.preamble_tokens[camera]
        assert status.stream_seconds == 0.0
        after = ask(stream.client, "What happened?", camera=camera)
        assert not after.success
        assert (
            after.error == f"no frame has been ingested on camera '{camera}' yet; ask again once it streams"
        )


# ---- the node's parameters, in process (no DDS traffic: the node is made, never spun) -----------


def make_node(context, **overrides) -> StreamNode:
    """A ``StreamNode`` of ``context`` with these parameter overrides (as ``-p`` would give them)."""
    given = [Parameter(name, value=value) for name, value in overrides.items()]
    return StreamNode(context=context, parameter_overrides=given)


def descriptor_of(node: StreamNode, name: str):
    return node.describe_parameter(name)


def test_the_node_declares_the_tree_with_descriptors_and_reads_compression_and_options(ros_context):
    node = make_node(
        ros_context,
        camera_topics=[FRONT_TOPIC],
        compression="drop_oldest",
        sink_tokens=8,
        **{"policy_options.run_penalty": 0.5, "policy_options.prefetch_predictor": "query"},
    )
    try:
        session = node.settings.config.session
        assert (session.policy, session.kv.compression, session.kv.sink_tokens) == (
            "mosaic",
            "drop_oldest",
            8,
        )
        assert (
            session.kv.options["run_penalty"] == 0.5 and session.kv.options["prefetch_predictor"] == "query"
        )
        budget = descriptor_of(node, "budget_tokens")
        assert budget.read_only and "Tokens of KV a question may bring to the device" in budget.description
        assert (budget.integer_range[0].from_value, budget.integer_range[0].to_value) == (1, 1 << 30)
        assert descriptor_of(node, "compression").additional_constraints == "one of: vsb, drop_oldest"
        cap = descriptor_of(node, "host_cap_mb")
        assert cap.type == ParameterType.PARAMETER_DOUBLE and "(MiB; 0 .. 1e+09)" in cap.description
        assert not descriptor_of(node, "max_question_chars").read_only  # a live setting of the sessions
        penalty = descriptor_of(node, "policy_options.run_penalty")
        assert penalty.read_only and penalty.description.startswith("Copy penalty, in shares of the marginal")
        assert descriptor_of(node, "policy_options.prefetch_predictor").additional_constraints == (
            "one of: tokens, query"
        )
    finally:
        node.destroy_node()


def test_the_node_starts_from_the_generated_yaml_at_the_trees_defaults(ros_context):
    node = StreamNode(context=ros_context, cli_args=["--ros-args", "--params-file", str(CONFIG_FILE)])
    try:
        assert node.settings.config == NodeConfig(camera_ids=["camera"], text_topics=[""])  # the file's
        assert node.settings.topics == NodeConfig().camera_topics
    finally:
        node.destroy_node()


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        ("    polcy: dense\n", "unknown parameter(s) polcy; known: action_result_timeout_s, "),
        (
            "    policy_options: {run_penalty: 0.5}\n",  # an option of mosaic, the file's policy is dense
            "unknown parameter(s) policy_options.run_penalty; known: ",
        ),
        (
            "    policy_options: {page_rows: 0}\n",
            "Parameter policy_options.page_rows out of range. Min: 1",
        ),
    ],
)
def test_a_yaml_key_outside_the_tree_is_refused_with_the_known_ones(ros_context, tmp_path, extra, message):
    params = tmp_path / "params.yaml"
    params.write_text(CONFIG_FILE.read_text().replace('policy: "mosaic"', 'policy: "dense"') + extra)
    with pytest.raises((ValueError, ParameterException)) as refused:  # rclpy refuses out-of-range values
        StreamNode(context=ros_context, cli_args=["--ros-args", "--params-file", str(params)])
    assert message in str(refused.value)


def test_a_setting_added_to_the_policy_config_is_a_parameter_a_flag_and_a_yaml_key(monkeypatch, ros_context):
    """A new PolicyConfig field, with its metadata, reaches the node (declared with its
    descriptor, read into the sessions' config), mosaic-ros-bench and mosaic-ros-run (a flag),
    and the YAML file (a key after its description): only the tree changes here, not the
    node's or the command lines' code."""
    from mosaic_ros.cli import bench, run

    @strict
    @dataclass
    class TunedPolicyConfig(PolicyConfig):
        probe_every: int = setting(3, "A knob added by the test.", unit="frames", low=0, high=10)

    @strict
    @dataclass
    class TunedSession(SessionConfig):
        kv: TunedPolicyConfig = nested(TunedPolicyConfig)

    @strict
    @dataclass
    class TunedNode(NodeConfig):
        session: TunedSession = nested(TunedSession, policy="mosaic")

    @strict
    @dataclass
    class TunedBench(BenchConfig):
        kv: TunedPolicyConfig = nested(TunedPolicyConfig, exclude=("options",), sink_tokens=32)

    monkeypatch.setattr(stream_params, "NodeConfig", TunedNode)
    monkeypatch.setattr(bench, "BenchConfig", TunedBench)
    monkeypatch.setattr(run, "RUN_DEFAULTS", TunedSession(max_new_tokens=32))

    node = make_node(ros_context, probe_every=7)
    try:
        knob = descriptor_of(node, "probe_every")
        assert knob.read_only and knob.type == ParameterType.PARAMETER_INTEGER
        assert knob.description.startswith("A knob added by the test (frames; 0 .. 10).")
        assert (knob.integer_range[0].from_value, knob.integer_range[0].to_value) == (0, 10)
        assert node.settings.config.session.kv.probe_every == 7
    finally:
        node.destroy_node()
    with pytest.raises(ParameterException, match="probe_every"):  # rclpy refuses it by its range
        make_node(ros_context, probe_every=11).destroy_node()

    assert (
        "    # A knob added by the test (frames; 0 .. 10).\n    probe_every: 3\n"
        in stream_params.stream_yaml()
    )
    assert "| `probe_every` | int | `3` | 0 .. 10 | no |" in stream_params.readme_table()

    parser = bench.build_parser()
    assert "--probe-every" in parser.format_help()
    assert config.from_arguments(TunedBench(), parser.parse_args(["--probe-every", "5"])).kv.probe_every == 5
    run_args = run.build_parser().parse_args(["--video", "v.avi", "--probe-every", "2"])
    assert config.from_arguments(run.RUN_DEFAULTS, run_args).kv.probe_every == 2
    with pytest.raises(config.ConfigError, match="probe_every must be <= 10, got 12"):
        config.from_arguments(TunedBench(), parser.parse_args(["--probe-every", "12"]))


def test_the_disk_tier_defaults_to_a_folder_of_memory_dir(ros_context, tmp_path):
    memory = tmp_path / "memory"
    node = make_node(ros_context, memory_dir=str(memory), host_cap_mb=64.0, disk_cap_mb=1024.0)
    try:
        kv = node.settings.config.session.kv
        assert kv.disk_dir == str(memory / ".disk") and (memory / ".disk").is_dir()
        assert kv.disk_cap_bytes == 1024 * 2**20
    finally:
        node.destroy_node()
    given = tmp_path / "nvme"
    given.mkdir()
    node = make_node(
        ros_context, memory_dir=str(memory), host_cap_mb=64.0, disk_cap_mb=1024.0, disk_dir=str(given)
    )
    try:
        assert node.settings.config.session.kv.disk_dir == str(given)  # a disk_dir given is kept
    finally:
        node.destroy_node()
    node = make_node(ros_context, memory_dir=str(memory))
    try:
        assert node.settings.config.session.kv.disk_dir == ""  # no disk cap: no tier
    finally:
        node.destroy_node()


def test_a_camera_id_cannot_take_the_nodes_own_folders(ros_context, tmp_path):
    with pytest.raises(config.ConfigError, match=r"camera_id '.disk' cannot name a snapshot directory"):
        make_node(ros_context, memory_dir=str(tmp_path), camera_ids=[".disk"])
