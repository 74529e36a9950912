"""Bad input and faults against a real node process over DDS; after each, the node still answers.

The module's node has three cameras fed (or not) by this test: ``raw`` (sensor_msgs/Image),
``jpeg`` (CompressedImage) and ``idle`` (never fed). It runs the default policy (mosaic), holds
at most two questions (``max_pending_questions: 2``: one answering, one queued) and samples at
100 fps, so every frame a test sends with a fresh stamp (1 s apart) is due.
"""

from __future__ import annotations

import itertools
import math
import re
import signal
import subprocess
import sys
import textwrap
import uuid
from dataclasses import dataclass

import cv2
import numpy as np
import pytest
import rclpy
from action_msgs.msg import GoalStatus
from diagnostic_msgs.msg import DiagnosticArray
from helpers import assert_documented, png_declaring
from mosaic_ros.action import AskVideo as AskVideoAction
from mosaic_ros.srv import AskVideo
from rclpy.action import ActionClient
from rclpy.context import Context
from rclpy.qos import QoSProfile
from sensor_msgs.msg import CompressedImage, Image
from std_msgs.msg import String
from std_srvs.srv import Trigger

from mosaic_ros.nodes.ask_client import AskClient, make_request
from mosaic_ros.nodes.processes import READY_MARK, ModuleProcess, start_stream_node

pytestmark = pytest.mark.ros

RAW_TOPIC = "/fault/raw"
JPEG_TOPIC = "/fault/jpeg/compressed"
IDLE_TOPIC = "/fault/idle"
NOTES_TOPIC = "/fault/notes"
TIMEOUT_S = 120.0
EXIT_BOUND_S = 5.0
_stamps = itertools.count(100)


@dataclass
class Faults:
    node: ModuleProcess
    client: AskClient
    raw: object
    jpeg: object


def image_msg(
    stamp: float, encoding: str = "rgb8", height: int = 48, width: int = 64, data: bytes | None = None
):
    msg = Image(encoding=encoding, height=height, width=width, step=width * 3)
    msg.header.stamp.sec, msg.header.frame_id = int(stamp), "raw"
    pixels = np.random.default_rng(int(stamp)).integers(0, 256, (height, width, 3), dtype=np.uint8)
    msg.data = pixels.tobytes() if data is None else data
    return msg


def jpeg_msg(stamp: float, data: bytes | None = None):
    msg = CompressedImage(format="jpeg")
    msg.header.stamp.sec = int(stamp)
    if data is None:
        frame = np.random.default_rng(int(stamp)).integers(0, 256, (48, 64, 3), dtype=np.uint8)
        data = cv2.imencode(".jpg", frame)[1].tobytes()
    msg.data = data
    return msg


def status_of(faults: Faults, camera: str, predicate, what: str):
    """Wait for a status of ``camera`` that satisfies ``predicate`` and return it."""
    client = faults.client

    def satisfied() -> bool:
        status = client.status.get(camera)
        return status is not None and predicate(status)

    assert client.spin_until(satisfied, TIMEOUT_S), f"{what}; last status: {client.status.get(camera)}"
    return client.status[camera]


def fresh_status(faults: Faults, camera: str):
    faults.client.status.pop(camera, None)
    return status_of(faults, camera, lambda s: True, f"a status of {camera}")


def ask(faults: Faults, question: str, **kwargs) -> AskVideo.Response:
    return faults.client.ask(make_request(question, **kwargs), TIMEOUT_S)


def assert_still_answers(faults: Faults, camera: str = "raw") -> None:
    response = ask(faults, "Is the node still answering?", camera=camera)
    assert response.success, response.error
    assert response.stats.frames_in_memory > 0


def answered_line(faults: Faults, question: str) -> str:
    """The node's log line about answering ``question``, once it is there."""
    faults.node.wait_for_output(repr(question), TIMEOUT_S)
    return next(line for line in faults.node.stderr().splitlines() if repr(question) in line)


def send_until_received(faults: Faults, camera: str, publisher, make_msg) -> None:
    """Publish valid frames until the node has received one: both sides of the DDS match exist."""
    before = fresh_status(faults, camera).frames_received
    client = faults.client

    def received() -> bool:
        publisher.publish(make_msg(next(_stamps)))
        status = client.status.get(camera)
        return status is not None and status.frames_received > before

    assert client.spin_until(received, TIMEOUT_S), f"{camera} never received a frame"


@pytest.fixture(scope="module")
def ros_module_context():
    context = Context()
    rclpy.init(context=context)
    yield context
    context.try_shutdown()


@pytest.fixture(scope="module")
def faults(tmp_path_factory, ros_module_context) -> Faults:
    work = tmp_path_factory.mktemp("faults")
    params = {
        "camera_topics": [RAW_TOPIC, JPEG_TOPIC, IDLE_TOPIC],
        "camera_ids": ["raw", "jpeg", "idle"],
        "text_topics": [NOTES_TOPIC],
        "sample_fps": 100.0,
        "policy": "mosaic",
        "max_new_tokens": 8,
        "max_pending_questions": 2,
        "status_period_s": 0.2,
    }
    node = start_stream_node(params, work)
    client = AskClient(
        "/mosaic_stream", name=f"fault_client_{uuid.uuid4().hex[:8]}", context=ros_module_context
    )
    raw = client.create_publisher(Image, RAW_TOPIC, QoSProfile(depth=10))
    jpeg = client.create_publisher(CompressedImage, JPEG_TOPIC, QoSProfile(depth=10))
    try:
        node.wait_for_output(READY_MARK, TIMEOUT_S)
        setup = Faults(node, client, raw, jpeg)
        send_until_received(setup, "raw", raw, image_msg)
        send_until_received(setup, "jpeg", jpeg, jpeg_msg)
        status_of(setup, "raw", lambda s: s.frames_ingested > 0, "raw frames ingested")
        status_of(setup, "jpeg", lambda s: s.frames_ingested > 0, "jpeg frames ingested")
        yield setup
    finally:
        client.close()
        code = node.stop()
        assert code == 0, node.stderr()
        assert "Traceback" not in node.stderr()


def test_question_before_any_frame_says_so(faults):
    response = ask(faults, "What do you see?", camera="idle")
    assert not response.success
    assert response.error == "no frame has been ingested on camera 'idle' yet; ask again once it streams"
    assert response.stats.policy == "mosaic"
    assert_still_answers(faults)


def test_image_shorter_than_step_times_height_is_counted_and_warned(faults):
    before = fresh_status(faults, "raw")
    short = image_msg(next(_stamps), data=bytes(48 * 64 * 3 - 1))
    faults.raw.publish(short)
    status_of(
        faults,
        "raw",
        lambda s: s.frames_dropped_invalid == before.frames_dropped_invalid + 1,
        "an invalid frame",
    )
    assert f"dropping invalid frame on {RAW_TOPIC}: data has 9215 B; step x height needs 9216 B" in (
        faults.node.stderr()
    )
    faults.raw.publish(image_msg(next(_stamps)))
    status_of(faults, "raw", lambda s: s.frames_ingested > before.frames_ingested, "a valid frame after it")
    assert_still_answers(faults)


def test_unknown_encoding_is_counted_and_warned_once_per_topic(faults):
    before = fresh_status(faults, "raw")
    # One at a time: a best-effort subscription of depth 1 keeps only the newest message.
    for n in (1, 2):
        faults.raw.publish(image_msg(next(_stamps), encoding="yuv422"))
        status_of(
            faults,
            "raw",
            lambda s, n=n: s.frames_dropped_invalid == before.frames_dropped_invalid + n,
            f"{n} invalid frames",
        )
    warnings = re.findall(rf"dropping invalid frame on {RAW_TOPIC}", faults.node.stderr())
    assert len(warnings) == 1
    assert_still_answers(faults)


def test_corrupt_compressed_image_is_counted_and_warned(faults):
    before = fresh_status(faults, "jpeg")
    faults.jpeg.publish(jpeg_msg(next(_stamps), data=b"\xff\xd8\xff\xe0 this is no jpeg"))
    status_of(
        faults,
        "jpeg",
        lambda s: s.frames_dropped_invalid == before.frames_dropped_invalid + 1,
        "an invalid jpeg",
    )
    assert f"dropping invalid frame on {JPEG_TOPIC}: compressed image of 20 B could not be decoded" in (
        faults.node.stderr()
    )
    faults.jpeg.publish(jpeg_msg(next(_stamps)))
    status_of(faults, "jpeg", lambda s: s.frames_ingested > before.frames_ingested, "a valid jpeg after it")
    assert_still_answers(faults, camera="jpeg")


def test_empty_and_oversized_questions_are_refused(faults):
    for question in ("", "   \n"):
        response = ask(faults, question)
        assert not response.success
        assert response.error == "question is empty"
    response = ask(faults, "x" * 2001)
    assert response.error == "question has 2001 characters; the limit is 2000"
    assert_still_answers(faults)


def test_unknown_camera_lists_the_known_ones(faults):
    response = ask(faults, "What is there?", camera="rear")
    assert not response.success
    assert response.error == "unknown camera_id 'rear'; known: raw, jpeg, idle"
    assert_still_answers(faults)


def test_backwards_time_jump_resets_that_stream(faults):
    start = fresh_status(faults, "raw").frames_ingested
    for n in (1, 2):
        faults.raw.publish(image_msg(next(_stamps)))
        status_of(faults, "raw", lambda s, n=n: s.frames_ingested >= start + n, f"{n} more frames ingested")
    before = fresh_status(faults, "raw")
    assert before.stream_seconds >= 1.0
    faults.raw.publish(image_msg(50))
    after = status_of(
        faults,
        "raw",
        lambda s: s.frames_ingested > before.frames_ingested,
        "the frame after the jump ingested",
    )
    assert after.stream_seconds == 0.0
    assert after.tokens_in_memory < before.tokens_in_memory
    assert "camera 'raw': time jumped back to 50.000 s" in faults.node.stderr()
    assert_still_answers(faults)


@dataclass
class LongAnswer:
    """An action goal still generating: its handle, 'generating' feedback and result future."""

    handle: object
    generating: list
    result: object


def start_long_answer(
    client: AskClient, actions: ActionClient, camera: str, min_tokens: int = 20, max_new_tokens: int = 4000
) -> LongAnswer:
    """Send goals until one is still generating after ``min_tokens`` tokens (``max_new_tokens``
    0: the node's default).

    Random weights may end an answer at any token; a greedy answer that has run this long
    has fallen into a loop and keeps going until cancelled or ``max_new_tokens``.
    """
    assert actions.wait_for_server(timeout_sec=TIMEOUT_S)
    for take in range(10):
        generating: list = []

        def on_feedback(msg, generating=generating) -> None:
            if msg.feedback.stage == "generating":
                generating.append(msg.feedback)

        goal = AskVideoAction.Goal(
            question=f"Tell a long story, take {take}.", camera_id=camera, max_new_tokens=max_new_tokens
        )
        sent = actions.send_goal_async(goal, feedback_callback=on_feedback)
        assert client.spin_until(sent.done, TIMEOUT_S), "goal not accepted"
        handle = sent.result()
        result = handle.get_result_async()
        client.spin_until(
            lambda generating=generating, result=result: len(generating) >= min_tokens or result.done(),
            TIMEOUT_S,
        )
        if not result.done():
            return LongAnswer(handle, generating, result)
    raise AssertionError("every answer ended early")


def finish(client: AskClient, answer: LongAnswer):
    """Cancel a long answer and return its result (status and AskVideo result)."""
    answer.handle.cancel_goal_async()
    assert client.spin_until(answer.result.done, TIMEOUT_S), "no result after cancel"
    return answer.result.result()


def questions_pending(faults: Faults, count: int) -> None:
    """Wait until /diagnostics says the node holds ``count`` questions (answering or queued)."""
    seen: list[str] = []

    def on_diagnostics(msg: DiagnosticArray) -> None:
        seen.extend(
            kv.value for status in msg.status for kv in status.values if kv.key == "questions_pending"
        )

    subscription = faults.client.create_subscription(DiagnosticArray, "/diagnostics", on_diagnostics, 10)
    try:
        assert faults.client.spin_until(lambda: str(count) in seen, TIMEOUT_S), (
            f"{count} questions never pending"
        )
    finally:
        faults.client.destroy_subscription(subscription)


@pytest.fixture
def actions(faults):
    client = ActionClient(faults.client, AskVideoAction, "/mosaic_stream/ask_stream")
    yield client
    client.destroy()


def test_more_questions_than_the_queue_holds_are_refused_at_once(faults, actions):
    long = start_long_answer(faults.client, actions, "raw")
    queued = faults.client.ask_async(make_request("I will wait my turn.", camera="raw"))
    questions_pending(faults, 2)
    busy = ask(faults, "Can you take another?")
    assert not busy.success
    assert busy.error == "busy: 2 questions pending; ask again later"
    final = finish(faults.client, long)
    assert final.status == GoalStatus.STATUS_CANCELED
    assert len(long.generating) <= final.result.stats.tokens_generated < 4000
    assert faults.client.spin_until(queued.done, TIMEOUT_S)
    assert queued.result().success, queued.result().error
    assert queued.result().stats.queue_ms > 0
    assert_still_answers(faults)


def test_action_client_that_disappears_mid_answer(faults):
    for _ in range(10):
        question = f"vanishing action {uuid.uuid4().hex[:8]}"
        command = [
            sys.executable, "-m", "mosaic_ros.nodes.ask_client", question,
            "--camera", "raw", "--max-new-tokens", "400", "--stream-tokens",
        ]  # fmt: skip
        client = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
        try:
            # 40 characters of answer: the random model is in a loop that goes on (see start_long_answer).
            in_flight = len(client.stdout.read(40)) == 40 and client.poll() is None
        finally:
            client.kill()
            client.wait()
        if in_flight:
            break
    assert in_flight, "every answer ended early"
    # The goal goes on without its client; the node answers it and stays usable.
    assert "answered on 'raw'" in answered_line(faults, question)
    assert faults.node.running()
    assert_still_answers(faults)


VANISHING_SERVICE_CLIENT = textwrap.dedent(
    """
    import sys, time, rclpy
    from mosaic_ros.srv import AskVideo
    rclpy.init()
    node = rclpy.create_node("vanishing_client")
    client = node.create_client(AskVideo, "/mosaic_stream/ask")
    assert client.wait_for_service(timeout_sec=60)
    client.call_async(AskVideo.Request(question=sys.argv[1], camera_id="raw"))
    print("sent", flush=True)
    time.sleep(60)
    """
)


def test_service_client_that_disappears_before_its_answer(faults, actions):
    long = start_long_answer(faults.client, actions, "raw")
    question = f"vanishing service {uuid.uuid4().hex[:8]}"
    client = subprocess.Popen(
        [sys.executable, "-c", VANISHING_SERVICE_CLIENT, question], stdout=subprocess.PIPE, text=True
    )
    try:
        assert client.stdout.readline().strip() == "sent"
        # The question waits behind the long answer: the node holds it when its client goes.
        questions_pending(faults, 2)
    finally:
        client.kill()
        client.wait()
    assert finish(faults.client, long).status == GoalStatus.STATUS_CANCELED
    assert "answered on 'raw'" in answered_line(faults, question)
    assert faults.node.running()
    assert_still_answers(faults)


def test_sigint_during_an_answer_exits_cleanly_and_fast(tmp_path, ros_module_context):
    topic = "/sigint/image_raw"
    params = {
        "camera_topics": [topic],
        "policy": "dense",
        "sample_fps": 100.0,
        "max_new_tokens": 8,
        "status_period_s": 0.2,
    }
    extra = ("--ros-args", "-r", "__ns:=/sigint", "-p", "max_new_tokens:=4000")
    node = start_stream_node(params, tmp_path, extra_args=extra)
    client = AskClient(
        "/sigint/mosaic_stream", name=f"sigint_client_{uuid.uuid4().hex[:8]}", context=ros_module_context
    )
    publisher = client.create_publisher(Image, topic, QoSProfile(depth=10))
    actions = ActionClient(client, AskVideoAction, "/sigint/mosaic_stream/ask_stream")
    try:
        node.wait_for_output(READY_MARK, TIMEOUT_S)
        assert client.spin_until(lambda: "sigint" in client.status, TIMEOUT_S)

        def ingested() -> bool:
            publisher.publish(image_msg(next(_stamps)))
            return client.status["sigint"].frames_ingested > 0

        assert client.spin_until(ingested, TIMEOUT_S), "no frame ingested"
        # Goals of the node's default length: 4000 from the command line, not 8 from the file.
        long = start_long_answer(client, actions, "sigint", max_new_tokens=0)
        node.process.send_signal(signal.SIGINT)
        assert node.wait(timeout=EXIT_BOUND_S) == 0
        assert client.spin_until(long.result.done, TIMEOUT_S), "the client got no result"
        final = long.result.result()
        assert final.status == GoalStatus.STATUS_ABORTED
        assert final.result.error == "cancelled"
        assert len(long.generating) <= final.result.stats.tokens_generated < 4000
    finally:
        actions.destroy()
        client.close()
        node.stop()
    assert "Traceback" not in node.stderr()
    assert "Failed to publish" not in node.stderr()


@pytest.mark.parametrize(
    ("params", "extra", "reason"),
    [
        (
            {"policy": "nonsense"},
            (),
            "cannot start: unknown KV policy 'nonsense'; known: dense, livevlm, mosaic",
        ),
        ({"device": "tpu"}, (), "cannot start: model 'tiny-random:qwen2.5-vl' on device 'tpu': "),
        ({"polcy": "dense"}, (), "cannot start: unknown parameter(s) polcy; known: "),
        # an option of another policy than the one selected
        (
            {"policy": "dense", "policy_options": {"run_penalty": 0.5}},
            (),
            "cannot start: unknown parameter(s) policy_options.run_penalty; known: ",
        ),
        ({"compression": "lz4"}, (), "cannot start: unknown compression 'lz4'; known: vsb, drop_oldest"),
        (
            {"model": "tiny-random:llava-ov", "pair_frames": True},
            (),
            "cannot start: pair_frames is a Qwen-VL option",
        ),
        ({"camera_topics": [""]}, (), "cannot start: camera_topics is empty: give at least one image topic"),
        ({"camera_topics": []}, (), "cannot start: camera_topics is empty: give at least one image topic"),
        (
            {},
            ("--params", "missing.yaml"),
            "cannot start: params file 'missing.yaml': No such file or directory",
        ),
        ({}, ("--params", "BROKEN"), "is not valid YAML"),
    ],
)
def test_a_bad_configuration_stops_the_node_at_start_with_the_reason(tmp_path, params, extra, reason):
    broken = tmp_path / "broken.yaml"
    broken.write_text("/**: {ros__parameters: [unclosed\n")
    extra = tuple(str(broken) if arg == "BROKEN" else arg for arg in extra)
    node = start_stream_node({"camera_topics": ["/bad/image_raw"], **params}, tmp_path, extra_args=extra)
    try:
        assert node.wait(timeout=TIMEOUT_S) == 1
    finally:
        node.stop()
    assert reason in node.stderr()
    assert "Traceback" not in node.stderr()
    if "policy" in params or "polcy" in params:  # refused before the model was loaded
        assert "loading model" not in node.stderr()


# ---- hostile input: each case, then a good question must still be answered -----------------


def stamped(msg, sec: int, nanosec: int = 0):
    msg.header.stamp.sec, msg.header.stamp.nanosec = sec, nanosec
    return msg


BAD_RAW_FRAMES = {
    "unknown encoding": lambda t: image_msg(t, encoding="yuv422"),
    "data shorter than step x height": lambda t: image_msg(t, data=bytes(100)),
    "zero size": lambda t: image_msg(t, height=0, width=0, data=b""),
    "step shorter than a row": lambda t: stamped(
        Image(encoding="rgb8", height=4, width=4, step=3, data=bytes(48)), t
    ),
    "huge declared size": lambda t: stamped(
        Image(encoding="rgb8", height=100_000, width=100_000, step=300_000, data=bytes(16)), t
    ),
    "negative stamp": lambda t: stamped(image_msg(t), -1),
    "nanoseconds of a second or more": lambda t: stamped(image_msg(t), t, 2_000_000_000),
    "no stamp in a stamped stream": lambda t: stamped(image_msg(t), 0),
}
BAD_COMPRESSED_FRAMES = {
    "empty": lambda t: jpeg_msg(t, data=b""),
    "garbage": lambda t: jpeg_msg(t, data=b"\x00" * 64),
    "bomb over OpenCV's limit (177 B)": lambda t: jpeg_msg(t, data=png_declaring(100_000, 100_000)),
    "bomb under OpenCV's limit": lambda t: jpeg_msg(t, data=png_declaring(12_000, 12_000)),
    "truncated png": lambda t: jpeg_msg(
        t, data=cv2.imencode(".png", np.zeros((48, 64, 3), np.uint8))[1].tobytes()[:50]
    ),
    "negative stamp": lambda t: stamped(jpeg_msg(t), -5),
}


@pytest.mark.parametrize(
    ("camera", "case"),
    [("raw", name) for name in BAD_RAW_FRAMES] + [("jpeg", name) for name in BAD_COMPRESSED_FRAMES],
)
def test_a_bad_frame_is_counted_invalid_and_the_stream_and_its_memory_go_on(faults, camera, case):
    make = (BAD_RAW_FRAMES if camera == "raw" else BAD_COMPRESSED_FRAMES)[case]
    publisher = faults.raw if camera == "raw" else faults.jpeg
    good = image_msg if camera == "raw" else jpeg_msg
    before = fresh_status(faults, camera)
    publisher.publish(make(next(_stamps)))
    status_of(
        faults,
        camera,
        lambda s: s.frames_dropped_invalid == before.frames_dropped_invalid + 1,
        f"{case} refused",
    )
    publisher.publish(good(next(_stamps)))
    after = status_of(
        faults, camera, lambda s: s.frames_ingested > before.frames_ingested, "a good frame after it"
    )
    assert after.faults == 0
    assert after.tokens_in_memory > before.tokens_in_memory  # nothing forgotten, one frame more
    assert after.stream_seconds > before.stream_seconds
    assert faults.node.running()
    assert_still_answers(faults, camera=camera)


BAD_REQUESTS = [
    (dict(question=""), "question is empty"),
    (dict(question="x" * 2001), "question has 2001 characters; the limit is 2000"),
    (dict(question="\U0001f600" * 1000), r"question is \d+ tokens long; the limit is 512"),
    (dict(question="hi", camera="rear"), "unknown camera_id 'rear'; known: raw, jpeg, idle"),
    (dict(question="hi", window_seconds=-2.0), r"window_seconds must be >= 0, got -2\.0"),
    (dict(question="hi", window_seconds=math.nan), "window_seconds must be >= 0, got nan"),
    (dict(question="hi", max_new_tokens=5000), "max_new_tokens 5000 is above the limit of 4096"),
    (
        dict(question="hi", window_start=10**9),
        r"the time window \[1000000000\.000, 1000000000\.000\] s holds no video; the stream holds .*",
    ),
    (
        dict(question="hi", window_start=1, window_end=2),
        r"the time window \[1\.000, 2\.000\] s holds no video; the stream holds .*",
    ),
    (dict(question="hi", window_start=5, window_end=3), r"invalid time window \[5\.0, 3\.0\]"),
]


@pytest.mark.parametrize(("fields", "error"), BAD_REQUESTS, ids=[e[:30] for _, e in BAD_REQUESTS])
def test_a_bad_request_is_refused_with_its_reason_and_the_node_answers_the_next(faults, fields, error):
    fields = dict(fields)
    start, end = fields.pop("window_start", 0), fields.pop("window_end", 0)
    request = make_request(fields.pop("question"), **fields)
    request.window_start.sec, request.window_end.sec = start, end
    response = faults.client.ask(request, TIMEOUT_S)
    assert not response.success
    assert re.fullmatch(error, response.error), response.error
    assert_documented(response.error)
    assert_still_answers(faults)


def test_an_infinite_window_means_the_whole_stream(faults):
    response = ask(faults, "What happened so far?", window_seconds=math.inf)
    assert response.success, response.error


def test_long_text_in_mosaic_memory_does_not_break_the_stream(faults):
    """A question of 456 tokens (1,120 characters) and an answer of up to 230 tokens are kept in
    memory (remember_dialogue); frames and questions after them must go on (mosaic once failed
    in its clusters here)."""
    before = fresh_status(faults, "raw")
    long_question = ("The robot drove down the long corridor and saw a red door. " * 19).strip()
    for question, tokens in ((long_question, 8), ("Tell me everything, at length.", 230)):
        response = ask(faults, question, camera="raw", max_new_tokens=tokens)
        assert response.success, response.error
        for _ in range(3):
            seen = fresh_status(faults, "raw").frames_ingested
            faults.raw.publish(image_msg(next(_stamps)))
            status_of(faults, "raw", lambda s, seen=seen: s.frames_ingested > seen, "a frame after long text")
    after = fresh_status(faults, "raw")
    assert after.faults == before.faults == 0
    assert after.tokens_in_memory > before.tokens_in_memory
    assert_still_answers(faults)


def test_a_burst_beyond_the_queue_is_all_answered_or_refused_none_lost(faults):
    """3 x max_pending_questions + 10 service requests and as many action goals, all at once."""
    burst = 3 * 2 + 10
    qos = QoSProfile(depth=4 * burst)  # the client keeps every reply too
    service = faults.client.create_client(AskVideo, "/mosaic_stream/ask", qos_profile=qos)
    actions = ActionClient(
        faults.client,
        AskVideoAction,
        "/mosaic_stream/ask_stream",
        goal_service_qos_profile=qos,
        result_service_qos_profile=qos,
    )
    try:
        assert service.wait_for_service(timeout_sec=TIMEOUT_S) and actions.wait_for_server(
            timeout_sec=TIMEOUT_S
        )
        calls = [service.call_async(make_request(f"Burst question {i}?", camera="raw")) for i in range(burst)]
        goals = [
            actions.send_goal_async(AskVideoAction.Goal(question=f"Burst goal {i}?", camera_id="raw"))
            for i in range(burst)
        ]
        assert faults.client.spin_until(lambda: all(g.done() for g in goals), TIMEOUT_S), "goals not accepted"
        results = [g.result().get_result_async() for g in goals]
        everything = calls + results
        assert faults.client.spin_until(lambda: all(f.done() for f in everything), TIMEOUT_S), (
            f"{sum(not f.done() for f in everything)} of {len(everything)} requests got no reply"
        )
        replies = [c.result() for c in calls] + [r.result().result for r in results]
        busy = "busy: 2 questions pending; ask again later"
        assert all(r.success or r.error == busy for r in replies), {r.error for r in replies}
        assert sum(r.success for r in replies) >= 2 and sum(not r.success for r in replies) > 0
    finally:
        actions.destroy()
        faults.client.destroy_client(service)
    assert_still_answers(faults)


def test_reset_says_how_many_streams_it_forgot(faults):
    client = faults.client.create_client(Trigger, "/mosaic_stream/reset")
    try:
        assert client.wait_for_service(timeout_sec=TIMEOUT_S)
        future = client.call_async(Trigger.Request())
        assert faults.client.spin_until(future.done, TIMEOUT_S)
        assert (future.result().success, future.result().message) == (True, "forgot the memory of 3 streams")
    finally:
        faults.client.destroy_client(client)
    for camera, publisher, make in (("raw", faults.raw, image_msg), ("jpeg", faults.jpeg, jpeg_msg)):
        seen = fresh_status(faults, camera).frames_ingested
        publisher.publish(make(next(_stamps)))
        status_of(faults, camera, lambda s, seen=seen: s.frames_ingested > seen, f"{camera} streams again")
    assert_still_answers(faults)


# ---- signals ---------------------------------------------------------------------------------


def test_sigint_twice_during_shutdown_still_exits_cleanly(tmp_path, ros_module_context):
    """``ros2 launch`` forwards the terminal's Ctrl-C: the node gets SIGINT twice, close together."""
    params = {"camera_topics": ["/twice/image_raw"], "policy": "dense", "status_period_s": 0.2}
    node = start_stream_node(params, tmp_path, extra_args=("--ros-args", "-r", "__ns:=/twice"))
    try:
        node.wait_for_output(READY_MARK, TIMEOUT_S)
        for _ in range(3):
            node.process.send_signal(signal.SIGINT)
        assert node.wait(timeout=EXIT_BOUND_S) == 0
    finally:
        node.stop()
    assert "Traceback" not in node.stderr()


@pytest.mark.parametrize("mark", ["mosaic_stream: starting", "loading model"])
def test_sigint_during_startup_exits_cleanly(tmp_path, mark):
    """Ctrl-C while the process imports rclpy and torch (right after it says it starts) or loads
    the model: status 0, no traceback."""
    params = {"camera_topics": ["/early/image_raw"], "policy": "dense"}
    node = start_stream_node(params, tmp_path)
    try:
        node.wait_for_output(mark, TIMEOUT_S)
        node.process.send_signal(signal.SIGINT)
        assert node.wait(timeout=TIMEOUT_S) == 0
    finally:
        node.stop()
    assert "Traceback" not in node.stderr()


def test_text_events_join_every_streams_memory_and_bad_ones_are_counted(faults):
    notes = faults.client.create_publisher(String, NOTES_TOPIC, QoSProfile(depth=10))
    try:
        before = {camera: fresh_status(faults, camera) for camera in ("raw", "jpeg", "idle")}

        # The reliable publisher may match the node after the first publish: publish until heard.
        def heard() -> bool:
            notes.publish(String(data="Operator: the charger moved to bay 7."))
            status = faults.client.status.get("idle")
            return status is not None and status.texts_ingested > before["idle"].texts_ingested

        assert faults.client.spin_until(heard, TIMEOUT_S), "no text event ingested"
        for camera in ("raw", "jpeg", "idle"):
            after = status_of(
                faults,
                camera,
                lambda s, c=camera: s.texts_ingested > before[c].texts_ingested,
                f"{camera} note",
            )
            assert after.tokens_in_memory > before[camera].tokens_in_memory
        dropped = fresh_status(faults, "raw").texts_dropped
        for bad in ("   ", "word " * 600):
            notes.publish(String(data=bad))
        status_of(faults, "raw", lambda s: s.texts_dropped == dropped + 2, "two bad notes dropped")
        assert "dropping a text event: text event is empty" in faults.node.stderr()
    finally:
        faults.client.destroy_publisher(notes)
    assert_still_answers(faults)


def test_a_crash_in_native_code_leaves_the_python_stack_on_stderr():
    """The node enables ``faulthandler`` first: a segfault during startup (here forced inside the
    node's run function) still says where it happened."""
    script = textwrap.dedent(
        """
        import ctypes
        from mosaic_ros.nodes import stream_main

        def crashing_run(argv, interrupts):
            ctypes.string_at(0)

        stream_main._run = crashing_run
        stream_main.main([])
        """
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert done.returncode == -signal.SIGSEGV
    assert "Fatal Python error: Segmentation fault" in done.stderr
    assert "in crashing_run" in done.stderr and "in main" in done.stderr
