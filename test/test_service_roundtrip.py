"""AskVideo over real DDS between two OS processes: a server subprocess, this test as client.

The server (``ask_video_server.py``) answers with values chosen so that any field lost,
swapped, truncated or mis-encoded on the way shows up as a mismatch.
"""

from __future__ import annotations

import json
import time
import uuid

import pytest
from action_msgs.msg import GoalStatus
from action_msgs.srv import CancelGoal
from ask_video_server import ANSWER_SUFFIX, DEFAULT_TOKENS, answer_words
from builtin_interfaces.msg import Time
from helpers import TEST_DIR, distinct_latency_stats, spin_until
from mosaic_ros.action import AskVideo as AskVideoAction
from mosaic_ros.srv import AskVideo
from rclpy.action import ActionClient
from rclpy.executors import SingleThreadedExecutor
from rclpy.node import Node

from mosaic_ros.nodes.processes import PythonProcess

pytestmark = pytest.mark.ros

DISCOVERY_TIMEOUT_S = 30.0
CALL_TIMEOUT_S = 30.0


def start_server(namespace: str, log_dir) -> PythonProcess:
    """The AskVideo test server under ``namespace``, in its own OS process."""
    return PythonProcess([str(TEST_DIR / "ask_video_server.py"), "--namespace", namespace], log_dir, "server")


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """The server process, under a namespace no other test run uses."""
    namespace = f"/t_{uuid.uuid4().hex[:12]}"
    log_dir = tmp_path_factory.mktemp("server")
    process = start_server(namespace, log_dir)
    try:
        yield namespace, process
    finally:
        process.stop()


@pytest.fixture
def client_node(ros_context):
    node = Node(f"ask_video_client_{uuid.uuid4().hex[:8]}", context=ros_context)
    executor = SingleThreadedExecutor(context=ros_context)
    executor.add_node(node)
    try:
        yield node, executor
    finally:
        executor.shutdown()
        node.destroy_node()


def call(executor, client, request, what: str):
    future = client.call_async(request)
    spin_until(executor, future.done, CALL_TIMEOUT_S, what)
    return future.result()


PROBE_WAIT_S = 1.0


def wait_for_service(executor, client, server_process, what: str) -> None:
    """Until a response has reached this client, not only until the client sees the service.

    ``service_is_ready`` says the client matched the server's endpoints; the server may not yet
    have matched the client's response reader, and Fast DDS then drops the response after a
    100 ms wait ("failed to send response (timeout)"), which a loaded machine exceeds. Discovery
    is the thing waited for: the probe (an empty question, which the server answers at once)
    is sent again while no answer has come back, then the test's own request goes out.
    """

    def ready() -> bool:
        assert server_process.running(), f"server exited:\n{server_process.output()}"
        return client.service_is_ready()

    spin_until(executor, ready, DISCOVERY_TIMEOUT_S, what)
    deadline = time.monotonic() + DISCOVERY_TIMEOUT_S
    while True:
        probe = client.call_async(AskVideo.Request(question=""))
        executor.spin_until_future_complete(probe, timeout_sec=PROBE_WAIT_S)
        if probe.done():
            return
        client.remove_pending_request(probe)
        assert server_process.running(), f"server exited:\n{server_process.output()}"
        assert time.monotonic() < deadline, f"no response from {what} in {DISCOVERY_TIMEOUT_S:.0f} s"


def test_service_answer_and_every_stat_cross_processes_intact(server, client_node):
    namespace, server_process = server
    node, executor = client_node
    client = node.create_client(AskVideo, f"{namespace}/ask")
    wait_for_service(executor, client, server_process, "the AskVideo service")
    request = AskVideo.Request(
        question="Qu'a fait le robot près de la porte ? 门口发生了什么？🚪",
        camera_id="front_left",
        window_seconds=42.5,
        window_start=Time(sec=1_700_000_000, nanosec=123_456_789),
        window_end=Time(sec=1_700_000_042, nanosec=999_999_999),
        max_new_tokens=2**32 - 1,
    )

    response = call(executor, client, request, "the AskVideo response")

    assert response.success is True
    assert response.error == ""
    assert response.answer.endswith(ANSWER_SUFFIX)
    echoed = json.loads(response.answer.removesuffix(ANSWER_SUFFIX))
    assert echoed == {
        "question": request.question,
        "camera_id": "front_left",
        "window_seconds": 42.5,
        "window_start": [1_700_000_000, 123_456_789],
        "window_end": [1_700_000_042, 999_999_999],
        "max_new_tokens": 2**32 - 1,
    }
    expected = distinct_latency_stats().as_dict()
    received = {name: getattr(response.stats, name) for name in expected}
    assert received == expected


def test_service_failure_comes_back_as_an_error_not_an_answer(server, client_node):
    namespace, server_process = server
    node, executor = client_node
    client = node.create_client(AskVideo, f"{namespace}/ask")
    wait_for_service(executor, client, server_process, "the AskVideo service")

    response = call(executor, client, AskVideo.Request(question=""), "the AskVideo response")

    assert response.success is False
    assert response.answer == ""
    assert response.error == "question is empty"


def send_goal(executor, action_client, goal, feedback: list):
    goal_future = action_client.send_goal_async(goal, feedback_callback=lambda m: feedback.append(m.feedback))
    spin_until(executor, goal_future.done, CALL_TIMEOUT_S, "the goal to be accepted or rejected")
    goal_handle = goal_future.result()
    assert goal_handle.accepted
    return goal_handle


def wait_for_action_server(executor, action_client, server_process) -> None:
    def ready() -> bool:
        assert server_process.running(), f"server exited:\n{server_process.output()}"
        return action_client.server_is_ready()

    spin_until(executor, ready, DISCOVERY_TIMEOUT_S, "the AskVideo action server")


def test_action_streams_feedback_then_returns_the_result(server, client_node):
    namespace, server_process = server
    node, executor = client_node
    action_client = ActionClient(node, AskVideoAction, f"{namespace}/ask")
    wait_for_action_server(executor, action_client, server_process)
    tokens = 6
    feedback: list = []

    goal = AskVideoAction.Goal(question="Où est la tasse ?", max_new_tokens=tokens)
    goal_handle = send_goal(executor, action_client, goal, feedback)
    result_future = goal_handle.get_result_async()
    spin_until(executor, result_future.done, CALL_TIMEOUT_S, "the action result")
    spin_until(
        executor,
        lambda: feedback and feedback[-1].tokens_generated == tokens,
        CALL_TIMEOUT_S,
        "the last feedback message",
    )

    outcome = result_future.result()
    assert outcome.status == GoalStatus.STATUS_SUCCEEDED
    result = outcome.result
    assert result.success is True
    assert result.error == ""
    assert result.answer == " ".join(answer_words(tokens))
    assert result.stats.tokens_generated == tokens
    assert result.stats.bytes_moved == distinct_latency_stats().bytes_moved
    counts = [message.tokens_generated for message in feedback]
    assert counts == sorted(set(counts)), "feedback arrived out of order or twice"
    for message in feedback:
        assert message.stage == "decoding"
        assert message.partial_answer == " ".join(answer_words(message.tokens_generated))


def test_action_goal_without_a_token_limit_uses_the_server_default(server, client_node):
    namespace, server_process = server
    node, executor = client_node
    action_client = ActionClient(node, AskVideoAction, f"{namespace}/ask")
    wait_for_action_server(executor, action_client, server_process)

    goal_handle = send_goal(executor, action_client, AskVideoAction.Goal(question="Et alors ?"), [])
    result_future = goal_handle.get_result_async()
    spin_until(executor, result_future.done, CALL_TIMEOUT_S, "the action result")

    assert result_future.result().result.stats.tokens_generated == DEFAULT_TOKENS


def test_action_cancel_stops_generation_and_returns_the_partial_answer(server, client_node):
    namespace, server_process = server
    node, executor = client_node
    action_client = ActionClient(node, AskVideoAction, f"{namespace}/ask")
    wait_for_action_server(executor, action_client, server_process)
    limit = 2**32 - 1
    feedback: list = []

    goal = AskVideoAction.Goal(question="Raconte tout.", max_new_tokens=limit)
    goal_handle = send_goal(executor, action_client, goal, feedback)
    spin_until(executor, lambda: len(feedback) >= 2, CALL_TIMEOUT_S, "feedback before cancelling")
    cancel_future = goal_handle.cancel_goal_async()
    spin_until(executor, cancel_future.done, CALL_TIMEOUT_S, "the cancel response")
    cancel = cancel_future.result()
    assert cancel.return_code == CancelGoal.Response.ERROR_NONE
    assert [bytes(g.goal_id.uuid) for g in cancel.goals_canceling] == [bytes(goal_handle.goal_id.uuid)]
    result_future = goal_handle.get_result_async()
    spin_until(executor, result_future.done, CALL_TIMEOUT_S, "the result of the cancelled goal")

    outcome = result_future.result()
    assert outcome.status == GoalStatus.STATUS_CANCELED
    result = outcome.result
    assert result.success is False
    assert result.error == "cancelled"
    generated = result.stats.tokens_generated
    assert feedback[-1].tokens_generated <= generated < limit
    assert result.answer == " ".join(answer_words(generated))


def test_server_process_exits_cleanly_on_sigint(tmp_path, client_node):
    node, executor = client_node
    namespace = f"/t_{uuid.uuid4().hex[:12]}"
    process = start_server(namespace, tmp_path)
    try:
        client = node.create_client(AskVideo, f"{namespace}/ask")
        wait_for_service(executor, client, process, "the AskVideo service of the second server")
        action_client = ActionClient(node, AskVideoAction, f"{namespace}/ask")
        wait_for_action_server(executor, action_client, process)
    finally:
        status = process.stop()
    assert status == 0, process.output()
    assert not process.running()
