"""``mosaic-ros-bag``: camera bags from videos, and their replay into ROS topics.

    mosaic-ros-bag from-video VIDEO OUT [--topic T] [--fps F] [--compressed] [--max-frames N]
        [--max-side PX] [--frame-id ID] [--start-time S]
    mosaic-ros-bag play BAG [--rate R] [--loop] [--clock] [--topic-remap A:=B ...]
        [--wait-subscribers N] [--wait-timeout S]

``from-video`` writes a ROS 2 bag (MCAP storage, metadata.yaml, bag format 9) with one
``sensor_msgs/Image`` (bgr8) or ``sensor_msgs/CompressedImage`` (JPEG) per kept frame,
header stamps and bag times at the frame's video time from ``--start-time``. Such a bag
plays with ``ros2 bag play OUT`` too. ``play`` publishes each recorded message's bytes
unchanged, at the recorded pace (times ``--rate``); ``--clock`` also publishes /clock from
the bag's time (for nodes with ``use_sim_time``).
"""

from __future__ import annotations

import argparse
import importlib
import signal
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
from rosbags.rosbag2 import Reader, StoragePlugin, Writer
from rosbags.typesys import Stores, get_typestore

from mosaic_ros.nodes.image_codec import fit_longest_side
from mosaic_ros.nodes.sampling import FrameSampler

TYPESTORE = Stores.ROS2_KILTED
IMAGE = "sensor_msgs/msg/Image"
COMPRESSED_IMAGE = "sensor_msgs/msg/CompressedImage"
# What image_transport's compressed publisher writes in CompressedImage.format.
JPEG_FORMAT = "bgr8; jpeg compressed bgr8"
JPEG_QUALITY = 90
CLOCK_PERIOD_S = 0.05
# DDS matches a publisher and a subscriber on each side on its own: once this publisher
# counts a subscriber, the subscriber may not have matched it yet and would miss the first
# messages of a best-effort topic. This much more waiting covers that on one machine.
MATCH_SETTLE_S = 1.0
# At the end, how long reliable subscribers may take to acknowledge the last messages.
ACK_TIMEOUT_S = 5.0


@dataclass
class BagSummary:
    """What ``video_to_bag`` wrote."""

    path: Path
    topic: str
    msgtype: str
    frames: int
    fps: float
    first_stamp_ns: int
    width: int
    height: int


def video_to_bag(
    video: str | Path,
    out: str | Path,
    topic: str | None = None,
    fps: float | None = None,
    compressed: bool = False,
    max_frames: int | None = None,
    max_side: int = 0,
    frame_id: str = "camera",
    start_time: float | None = None,
) -> BagSummary:
    """Write the frames of ``video`` into a new bag folder ``out``.

    ``fps``: frames kept per second of video (default: all frames). ``start_time``: epoch
    seconds of the first frame (default: now). ``max_side``: longest side in pixels (0: as is).
    Raises ``ValueError`` when the video cannot be read or yields no frame.
    """
    capture = cv2.VideoCapture(str(video))
    if not capture.isOpened():
        raise ValueError(f"cannot open video {video}")
    source_fps = capture.get(cv2.CAP_PROP_FPS)
    if not source_fps > 0:
        raise ValueError(f"video {video} reports no frame rate")
    topic = topic or ("/camera/image_raw/compressed" if compressed else "/camera/image_raw")
    msgtype = COMPRESSED_IMAGE if compressed else IMAGE
    sampler = FrameSampler(fps or source_fps)
    start_ns = round((time.time() if start_time is None else start_time) * 1e9)
    typestore = get_typestore(TYPESTORE)
    types = typestore.types
    written, first_ns, shape = 0, 0, (0, 0)
    with Writer(Path(out), version=9, storage_plugin=StoragePlugin.MCAP) as writer:
        connection = writer.add_connection(topic, msgtype, typestore=typestore)
        index = 0
        while max_frames is None or written < max_frames:
            ok, frame = capture.read()
            if not ok:
                break
            video_time = index / source_fps
            index += 1
            if not sampler.is_due(video_time):
                continue
            sampler.commit(video_time)
            frame = fit_longest_side(frame, max_side)
            stamp_ns = start_ns + round(video_time * 1e9)
            sec, nanosec = divmod(stamp_ns, 1_000_000_000)
            header = types["std_msgs/msg/Header"](
                stamp=types["builtin_interfaces/msg/Time"](sec=sec, nanosec=nanosec), frame_id=frame_id
            )
            if compressed:
                encoded, jpeg = cv2.imencode(".jpg", frame, [cv2.IMWRITE_JPEG_QUALITY, JPEG_QUALITY])
                if not encoded:
                    raise ValueError(f"OpenCV cannot encode frame {index} of {video} as JPEG")
                msg = types[COMPRESSED_IMAGE](header=header, format=JPEG_FORMAT, data=jpeg.reshape(-1))
            else:
                height, width = frame.shape[:2]
                msg = types[IMAGE](
                    header=header, height=height, width=width, encoding="bgr8", is_bigendian=0,
                    step=width * 3, data=np.ascontiguousarray(frame).reshape(-1),
                )  # fmt: skip
            writer.write(connection, stamp_ns, typestore.serialize_cdr(msg, msgtype))
            if written == 0:
                first_ns, shape = stamp_ns, frame.shape[:2]
            written += 1
    capture.release()
    if written == 0:
        raise ValueError(f"video {video} gave no frame")
    return BagSummary(Path(out), topic, msgtype, written, fps or source_fps, first_ns, shape[1], shape[0])


def message_class(msgtype: str):
    """The rclpy class of a ROS type name such as ``sensor_msgs/msg/Image``."""
    package, kind, name = msgtype.split("/")
    try:
        return getattr(importlib.import_module(f"{package}.{kind}"), name)
    except (ImportError, AttributeError) as error:
        raise ValueError(f"message type {msgtype} is not installed here: {error}") from error


def play_bag(
    bag: str | Path,
    rate: float = 1.0,
    loop: bool = False,
    clock: bool = False,
    remap: dict[str, str] | None = None,
    wait_subscribers: int = 0,
    wait_timeout: float = 30.0,
    stop: threading.Event | None = None,
    context=None,
) -> dict[str, int]:
    """Publish every message of ``bag`` at the recorded pace; returns messages per topic.

    Needs ``rclpy.init()`` first. ``wait_subscribers``: first wait (at most ``wait_timeout``
    s) until every topic has that many subscribers. Playback ends after the bag (or, with
    ``loop``, never) or as soon as ``stop`` is set; the counts are of messages published.
    """
    from rclpy.duration import Duration
    from rclpy.node import Node
    from rclpy.qos import QoSProfile
    from rosgraph_msgs.msg import Clock

    if not rate > 0:
        raise ValueError(f"rate must be > 0, got {rate}")
    remap = remap or {}
    stop = stop or threading.Event()
    published: dict[str, int] = {}
    node = Node("mosaic_bag_player", context=context)
    try:
        with Reader(Path(bag)) as reader:
            publishers = {}
            for connection in reader.connections:
                topic = remap.get(connection.topic, connection.topic)
                msg_class = message_class(connection.msgtype)
                publishers[connection.id] = (
                    topic,
                    node.create_publisher(msg_class, topic, QoSProfile(depth=10)),
                )
                published.setdefault(topic, 0)
            clock_pub = node.create_publisher(Clock, "/clock", QoSProfile(depth=10)) if clock else None
            _wait_for_subscribers([p for _, p in publishers.values()], wait_subscribers, wait_timeout, stop)
            while not stop.is_set():
                start_wall, first_ns = time.monotonic(), None
                for connection, stamp_ns, raw in reader.messages():
                    first_ns = stamp_ns if first_ns is None else first_ns
                    due = start_wall + (stamp_ns - first_ns) * 1e-9 / rate
                    if not _wait_until(due, stop, clock_pub, first_ns, start_wall, rate):
                        break
                    if clock_pub is not None:
                        _publish_clock(clock_pub, stamp_ns)
                    topic, publisher = publishers[connection.id]
                    publisher.publish(bytes(raw))
                    published[topic] += 1
                if not loop:
                    break
            # Reliable subscribers may still be fetching the last messages: leaving now would
            # take them away.
            for _, publisher in publishers.values():
                publisher.wait_for_all_acked(Duration(seconds=ACK_TIMEOUT_S))
    finally:
        node.destroy_node()
    return published


def _wait_for_subscribers(publishers, count: int, timeout: float, stop: threading.Event) -> None:
    if count <= 0:
        return
    deadline = time.monotonic() + timeout
    while any(p.get_subscription_count() < count for p in publishers) and not stop.is_set():
        if time.monotonic() > deadline:
            missing = [p.topic_name for p in publishers if p.get_subscription_count() < count]
            raise TimeoutError(f"no {count} subscribers on {', '.join(missing)} after {timeout:.0f} s")
        stop.wait(0.05)
    stop.wait(MATCH_SETTLE_S)


def _wait_until(
    due: float, stop: threading.Event, clock_pub, first_ns: int, start_wall: float, rate: float
) -> bool:
    """Wait until the monotonic time ``due``, publishing /clock meanwhile when asked to;
    False when ``stop`` was set first."""
    while (remaining := due - time.monotonic()) > 0:
        if stop.wait(min(remaining, CLOCK_PERIOD_S) if clock_pub is not None else remaining):
            return False
        if clock_pub is not None and due - time.monotonic() > 0:
            _publish_clock(clock_pub, first_ns + round((time.monotonic() - start_wall) * rate * 1e9))
    return not stop.is_set()


def _publish_clock(publisher, stamp_ns: int) -> None:
    from rosgraph_msgs.msg import Clock

    msg = Clock()
    msg.clock.sec, msg.clock.nanosec = divmod(stamp_ns, 1_000_000_000)
    publisher.publish(msg)


def _parse_remaps(pairs: list[str]) -> dict[str, str]:
    remap = {}
    for pair in pairs:
        source, sep, target = pair.partition(":=")
        if not sep or not source or not target:
            raise SystemExit(f"--topic-remap wants FROM:=TO, got {pair!r}")
        remap[source] = target
    return remap


def _parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="mosaic-ros-bag", description="Camera bags from videos, and replay."
    )
    commands = parser.add_subparsers(dest="command", required=True)
    convert = commands.add_parser("from-video", help="write a bag (MCAP) from a video file")
    convert.add_argument("video")
    convert.add_argument("out", help="bag folder to create")
    convert.add_argument("--topic", help="default /camera/image_raw (or .../compressed)")
    convert.add_argument("--fps", type=float, help="frames per second of video to keep (default: all)")
    convert.add_argument("--compressed", action="store_true", help="sensor_msgs/CompressedImage (JPEG)")
    convert.add_argument("--max-frames", type=int, help="stop after this many frames")
    convert.add_argument("--max-side", type=int, default=0, help="shrink so the longest side is at most PX")
    convert.add_argument("--frame-id", default="camera", help="header.frame_id")
    convert.add_argument(
        "--start-time", type=float, help="stamp of the first frame, epoch seconds (default: now)"
    )
    play = commands.add_parser("play", help="publish a bag's messages at their recorded pace")
    play.add_argument("bag")
    play.add_argument("--rate", type=float, default=1.0)
    play.add_argument("--loop", action="store_true")
    play.add_argument("--clock", action="store_true", help="publish /clock from the bag's time")
    play.add_argument("--topic-remap", action="append", default=[], metavar="FROM:=TO")
    play.add_argument(
        "--wait-subscribers", type=int, default=0, help="wait for N subscribers per topic first"
    )
    play.add_argument("--wait-timeout", type=float, default=30.0, help="seconds to wait for them")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = _parse(sys.argv[1:] if argv is None else argv)
    if args.command == "from-video":
        try:
            summary = video_to_bag(
                args.video, args.out, topic=args.topic, fps=args.fps, compressed=args.compressed,
                max_frames=args.max_frames, max_side=args.max_side, frame_id=args.frame_id,
                start_time=args.start_time,
            )  # fmt: skip
        except (ValueError, FileExistsError) as error:
            print(f"mosaic-ros-bag: {error}", file=sys.stderr)
            return 1
        print(
            f"wrote {summary.frames} frames ({summary.width}x{summary.height}, {summary.fps:g} fps) "
            f"on {summary.topic} [{summary.msgtype}] to {summary.path}"
        )
        return 0

    import rclpy
    from rclpy.signals import SignalHandlerOptions

    # Ctrl-C (or SIGTERM) ends playback between two messages, so the counts are exact.
    stop = threading.Event()
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, lambda _signum, _frame: stop.set())
    rclpy.init(args=[sys.argv[0]], signal_handler_options=SignalHandlerOptions.NO)
    published: dict[str, int] = {}
    code = 0
    try:
        published = play_bag(
            args.bag, rate=args.rate, loop=args.loop, clock=args.clock, remap=_parse_remaps(args.topic_remap),
            wait_subscribers=args.wait_subscribers, wait_timeout=args.wait_timeout, stop=stop,
        )  # fmt: skip
    except (ValueError, TimeoutError) as error:
        print(f"mosaic-ros-bag: {error}", file=sys.stderr)
        code = 1
    finally:
        rclpy.try_shutdown()
    for topic, count in published.items():
        print(f"published {count} messages on {topic}")
    return code


if __name__ == "__main__":
    sys.exit(main())
