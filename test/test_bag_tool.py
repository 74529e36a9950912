"""Bags from videos, read back with rosbags; their replay over DDS, recorded raw and decoded."""

from __future__ import annotations

import subprocess
import sys
import uuid

import cv2
import numpy as np
import pytest
import rclpy
import yaml
from helpers import spin_until
from rclpy.qos import QoSProfile, ReliabilityPolicy
from rclpy.serialization import deserialize_message
from rosbags.rosbag2 import Reader
from rosbags.typesys import Stores, get_typestore
from rosgraph_msgs.msg import Clock
from sensor_msgs.msg import Image

from mosaic_ros.nodes.bag_tool import JPEG_FORMAT, video_to_bag
from mosaic_ros.nodes.demo import default_video
from mosaic_ros.nodes.image_codec import decode_compressed, fit_longest_side
from mosaic_ros.nodes.processes import ModuleProcess

START_S = 1_700_000_000.25
TIMEOUT_S = 60.0


def source_frames(video, count: int) -> list[np.ndarray]:
    capture = cv2.VideoCapture(str(video))
    frames = []
    while len(frames) < count:
        ok, frame = capture.read()
        assert ok
        frames.append(frame)
    capture.release()
    return frames


def read_bag(path) -> list[tuple[str, int, object]]:
    """(topic, bag time ns, decoded message) of every message."""
    typestore = get_typestore(Stores.ROS2_KILTED)
    with Reader(path) as reader:
        return [
            (conn.topic, stamp, typestore.deserialize_cdr(raw, conn.msgtype))
            for conn, stamp, raw in reader.messages()
        ]


@pytest.fixture(scope="module")
def video(tmp_path_factory):
    return default_video(tmp_path_factory.mktemp("video"))


def test_from_video_writes_the_frames_with_their_video_stamps(video, tmp_path):
    source_fps = cv2.VideoCapture(str(video)).get(cv2.CAP_PROP_FPS)
    step = round(source_fps / 5.0)  # 5 fps out of the source's rate: every step-th frame
    summary = video_to_bag(video, tmp_path / "bag", fps=5.0, max_frames=6, max_side=96, start_time=START_S)
    assert (summary.frames, summary.topic, summary.msgtype) == (
        6,
        "/camera/image_raw",
        "sensor_msgs/msg/Image",
    )
    messages = read_bag(tmp_path / "bag")
    assert len(messages) == 6
    frames = source_frames(video, 6 * step)
    for i, (topic, bag_ns, msg) in enumerate(messages):
        expected_ns = round(START_S * 1e9) + round(i * step / source_fps * 1e9)
        assert topic == "/camera/image_raw"
        assert bag_ns == expected_ns
        assert msg.header.stamp.sec * 1_000_000_000 + msg.header.stamp.nanosec == expected_ns
        assert msg.header.frame_id == "camera"
        assert msg.encoding == "bgr8" and msg.is_bigendian == 0
        assert max(msg.width, msg.height) == 96
        assert msg.step == msg.width * 3
        expected = fit_longest_side(frames[i * step], 96)
        np.testing.assert_array_equal(msg.data.reshape(msg.height, msg.width, 3), expected)


def test_from_video_compressed_writes_jpeg_close_to_the_source(video, tmp_path):
    summary = video_to_bag(
        video,
        tmp_path / "bag",
        compressed=True,
        max_frames=3,
        max_side=128,
        frame_id="cam",
        start_time=START_S,
    )
    assert summary.topic == "/camera/image_raw/compressed"
    frames = source_frames(video, 3)
    messages = read_bag(tmp_path / "bag")
    assert len(messages) == 3
    for (_, _, msg), frame in zip(messages, frames, strict=True):
        assert msg.format == JPEG_FORMAT and msg.header.frame_id == "cam"
        decoded = decode_compressed(msg.data)
        expected = cv2.cvtColor(fit_longest_side(frame, 128), cv2.COLOR_BGR2RGB)
        assert decoded.shape == expected.shape
        assert np.abs(decoded.astype(int) - expected).mean() < 8


def test_bag_metadata_is_what_ros2_bag_play_reads(video, tmp_path):
    video_to_bag(video, tmp_path / "bag", max_frames=2, max_side=64, start_time=START_S)
    info = yaml.safe_load((tmp_path / "bag" / "metadata.yaml").read_text())["rosbag2_bagfile_information"]
    assert info["storage_identifier"] == "mcap"
    assert info["version"] == 9
    assert info["message_count"] == 2
    (topic,) = info["topics_with_message_count"]
    assert topic["topic_metadata"]["type"] == "sensor_msgs/msg/Image"
    assert topic["topic_metadata"]["serialization_format"] == "cdr"
    assert info["starting_time"]["nanoseconds_since_epoch"] == round(START_S * 1e9)
    assert [p.suffix for p in (tmp_path / "bag").iterdir() if p.name != "metadata.yaml"] == [".mcap"]


def test_cli_reports_a_video_it_cannot_read(tmp_path):
    command = [sys.executable, "-m", "mosaic_ros.nodes.bag_tool", "from-video", str(tmp_path / "none.avi")]
    result = subprocess.run(
        [*command, str(tmp_path / "b")], capture_output=True, text=True, timeout=TIMEOUT_S
    )
    assert result.returncode == 1
    assert "cannot open video" in result.stderr


@pytest.fixture
def recorder(ros_context):
    node = rclpy.create_node(f"recorder_{uuid.uuid4().hex[:8]}", context=ros_context)
    executor = rclpy.executors.SingleThreadedExecutor(context=ros_context)
    executor.add_node(node)
    yield node, executor
    executor.shutdown()
    node.destroy_node()


@pytest.mark.ros
def test_play_publishes_the_recorded_messages_and_clock(video, tmp_path, recorder):
    node, executor = recorder
    video_to_bag(video, tmp_path / "bag", fps=5.0, max_frames=8, max_side=64, start_time=START_S)
    recorded: list[bytes] = []
    clocks: list[int] = []
    qos = QoSProfile(depth=100, reliability=ReliabilityPolicy.RELIABLE)
    node.create_subscription(Image, "/replay/image", recorded.append, qos, raw=True)
    node.create_subscription(
        Clock, "/clock", lambda m: clocks.append(m.clock.sec * 10**9 + m.clock.nanosec), qos
    )
    args = ["play", str(tmp_path / "bag"), "--rate", "4", "--clock", "--wait-subscribers", "1"]
    args += ["--topic-remap", "/camera/image_raw:=/replay/image"]
    with ModuleProcess("bag_tool", args, tmp_path, name="player") as player:
        spin_until(executor, lambda: len(recorded) == 8, TIMEOUT_S, "8 replayed messages")
        assert player.wait(TIMEOUT_S) == 0, player.stderr()
    assert player.stdout().strip() == "published 8 messages on /replay/image"
    expected = [msg for _, _, msg in read_bag(tmp_path / "bag")]
    for raw, want in zip(recorded, expected, strict=True):
        got = deserialize_message(raw, Image)
        assert (got.header.stamp.sec, got.header.stamp.nanosec) == (
            want.header.stamp.sec,
            want.header.stamp.nanosec,
        )
        assert got.header.frame_id == want.header.frame_id
        assert (got.height, got.width, got.step, got.encoding) == (
            want.height,
            want.width,
            want.step,
            want.encoding,
        )
        assert bytes(got.data) == want.data.tobytes()
    stamps = [m.header.stamp.sec * 10**9 + m.header.stamp.nanosec for m in expected]
    spin_until(executor, lambda: clocks and clocks[-1] == stamps[-1], TIMEOUT_S, "/clock at the last stamp")
    assert clocks == sorted(clocks)
    assert stamps[0] <= clocks[0]


@pytest.mark.ros
def test_play_loops_until_interrupted(video, tmp_path, recorder):
    node, executor = recorder
    video_to_bag(video, tmp_path / "bag", fps=5.0, max_frames=3, max_side=32, start_time=START_S)
    recorded: list[bytes] = []
    qos = QoSProfile(depth=100, reliability=ReliabilityPolicy.RELIABLE)
    node.create_subscription(Image, "/camera/image_raw", recorded.append, qos, raw=True)
    args = ["play", str(tmp_path / "bag"), "--rate", "10", "--loop", "--wait-subscribers", "1"]
    with ModuleProcess("bag_tool", args, tmp_path, name="player") as player:
        spin_until(executor, lambda: len(recorded) >= 7, TIMEOUT_S, "a second and third loop")
        assert player.stop() == 0, player.stderr()
    published = int(player.stdout().split()[1])
    assert published >= 7
    stamps = [deserialize_message(raw, Image).header.stamp for raw in recorded[:7]]
    assert [s.sec * 10**9 + s.nanosec for s in stamps[3:6]] == [s.sec * 10**9 + s.nanosec for s in stamps[:3]]
