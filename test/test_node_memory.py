"""The node's memory outlives the process: ask, save, kill -9, restart on the same memory_dir,
and the same question gets the same answer over the same memory (dense policy, seeded tiny
model on the CPU, so answers are bit-identical)."""

from __future__ import annotations

import uuid

import numpy as np
import pytest
import rclpy
from rclpy.context import Context
from sensor_msgs.msg import Image
from std_srvs.srv import Trigger

from mosaic_ros.nodes.ask_client import AskClient, make_request
from mosaic_ros.nodes.processes import READY_MARK, start_stream_node

pytestmark = pytest.mark.ros

TOPIC = "/memory/raw"
TIMEOUT_S = 120.0
FRAMES = 3


def image_msg(stamp: int) -> Image:
    msg = Image(encoding="rgb8", height=48, width=64, step=64 * 3)
    msg.header.stamp.sec = stamp
    msg.data = np.random.default_rng(stamp).integers(0, 256, (48, 64, 3), dtype=np.uint8).tobytes()
    return msg


def status(client: AskClient, predicate, what: str):
    client.status.pop("cam", None)

    def satisfied() -> bool:
        s = client.status.get("cam")
        return s is not None and predicate(s)

    assert client.spin_until(satisfied, TIMEOUT_S), f"{what}; last status: {client.status.get('cam')}"
    return client.status["cam"]


def call_save(client: AskClient) -> Trigger.Response:
    save = client.create_client(Trigger, "/mosaic_stream/save")
    assert save.wait_for_service(timeout_sec=TIMEOUT_S)
    future = save.call_async(Trigger.Request())
    assert client.spin_until(future.done, TIMEOUT_S)
    return future.result()


def ask(client: AskClient, question: str):
    response = client.ask(make_request(question, camera="cam"), TIMEOUT_S)
    assert response.success, response.error
    return response


def new_client(context) -> AskClient:
    return AskClient("/mosaic_stream", name=f"memory_client_{uuid.uuid4().hex[:8]}", context=context)


def test_memory_survives_kill_9_and_the_same_question_gets_the_same_answer(tmp_path, ros_context):
    params = {
        "camera_topics": [TOPIC],
        "camera_ids": ["cam"],
        "sample_fps": 100.0,
        "policy": "dense",
        "device": "cpu",
        "dtype": "float32",
        "seed": 0,
        "max_new_tokens": 8,
        "status_period_s": 0.2,
        "memory_dir": str(tmp_path / "memory"),
    }
    client = new_client(ros_context)
    publisher = client.create_publisher(Image, TOPIC, 10)
    first = start_stream_node(params, tmp_path, name="first")
    try:
        first.wait_for_output(READY_MARK, TIMEOUT_S)
        for k in range(1, FRAMES + 1):  # one at a time: the subscription keeps only the newest frame

            def ingested(k=k) -> bool:
                publisher.publish(image_msg(10 + k))  # the same stamp again is not due twice
                s = client.status.get("cam")
                return s is not None and s.frames_ingested >= k

            assert client.spin_until(ingested, TIMEOUT_S), f"frame {k} never ingested"
        ask(client, "What do you see?")  # its question and answer join the memory
        saved = call_save(client)
        assert saved.success, saved.message
        assert saved.message.startswith("saved 1 stream: cam: ")
        reference = ask(client, "What happened first?")  # after the snapshot: not in it
        shown = status(client, lambda s: s.snapshot_bytes > 0, "a status with the snapshot")
        assert shown.snapshot_age_s >= 0.0
    finally:
        client.destroy_node()
        first.process.kill()  # kill -9: no shutdown snapshot
        first.stop()
    # A client in a new context (a new DDS participant) that never saw the killed node, whose
    # endpoints the old one would keep matching until their lease ran out.
    context = Context()
    rclpy.init(context=context)
    second = start_stream_node(params, tmp_path, name="second")
    try:
        client = new_client(context)
        second.wait_for_output(READY_MARK, TIMEOUT_S)
        assert "camera 'cam': restored " in second.stderr()
        status(client, lambda s: s.frames_ingested == 0, "a status of the restarted node")
        again = ask(client, "What happened first?")
        assert again.answer == reference.answer
        assert again.stats.tokens_in_memory == reference.stats.tokens_in_memory
        assert again.stats.frames_in_memory == FRAMES
        client.destroy_node()
    finally:
        code = second.stop()
        context.try_shutdown()
    assert code == 0, second.stderr()
    assert "memory snapshot at shutdown: saved 1 stream: cam: " in second.stderr()
    assert "Traceback" not in second.stderr()
