"""``mosaic-ros-demo``: the whole pipeline on one machine, every stage real.

    mosaic-ros-demo [--video PATH | --bag PATH] [--model tiny-random:qwen2.5-vl] [--policy mosaic]
        [--questions Q ...] [--json]

1. turns the video into a ROS 2 bag (unless ``--bag`` is given);
2. starts the stream node as a separate process, with a temporary parameters file;
3. replays the bag as a camera topic (another process, publishing /clock; the node runs
   on simulated time);
4. asks questions through the ``~/ask`` service while the bag plays and after it ended;
5. prints each answer with its latency breakdown, and the node's stream status;
6. stops everything. DDS traffic stays on this machine (LOCALHOST discovery, and a domain id
   of its own unless ROS_DOMAIN_ID is set).

Without ``--video`` or ``--bag`` it uses OpenCV's sample ``vtest.avi`` when installed
(Debian: opencv-doc), otherwise it renders a short clip of moving shapes.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import cv2
import numpy as np

from mosaic_ros.nodes.ask_client import AskClient, format_stats, make_request, stats_dict
from mosaic_ros.nodes.bag_tool import COMPRESSED_IMAGE, IMAGE, video_to_bag
from mosaic_ros.nodes.processes import READY_MARK, ModuleProcess, isolate_ros_environment, start_stream_node

DEFAULT_VIDEO = Path("/usr/share/doc/opencv-doc/examples/data/vtest.avi")
DEFAULT_QUESTIONS = (
    "What is happening in the video?",
    "How many people can be seen?",
    "What changed in the last few seconds?",
)
TINY_NOTE = (
    "The model is a tiny-random build: its weights are random, so the answers are not "
    "meaningful. Every stage is real: DDS transport, decoding, sampling, vision encoding, "
    "KV memory, retrieval, prefill and decoding. Pass --model with real weights for real answers."
)
CAMERA_ID = "camera"
SETTLE_TIMEOUT_S = 10.0
NODE_NAME = "/mosaic_stream"


@dataclass
class DemoResult:
    model: str
    policy: str
    source: str
    topic: str
    frames_published: int = 0
    answers: list[dict] = field(default_factory=list)
    status: dict = field(default_factory=dict)
    note: str = ""


def render_synthetic_clip(
    path: Path, frames: int = 60, fps: float = 10.0, size: tuple[int, int] = (320, 240)
) -> Path:
    """Write a clip of a red disc and a blue square moving over a grey floor (MJPG AVI)."""
    width, height = size
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"MJPG"), fps, size)
    if not writer.isOpened():
        raise RuntimeError(f"OpenCV cannot write {path}")
    for i in range(frames):
        frame = np.full((height, width, 3), 90, np.uint8)
        frame[height // 2 :, :] = (60, 110, 60)
        t = i / max(frames - 1, 1)
        cx = int(20 + t * (width - 40))
        cv2.circle(frame, (cx, height // 3), 18, (40, 40, 220), -1)
        sx = int((1 - t) * (width - 60))
        cv2.rectangle(frame, (sx, 2 * height // 3 - 20), (sx + 40, 2 * height // 3 + 20), (200, 80, 30), -1)
        writer.write(frame)
    writer.release()
    return path


def default_video(work: Path) -> Path:
    """OpenCV's sample vtest.avi (pedestrians) when installed, else a clip rendered in ``work``."""
    return DEFAULT_VIDEO if DEFAULT_VIDEO.exists() else render_synthetic_clip(work / "synthetic.avi")


def bag_camera_topic(bag: Path) -> tuple[str, int]:
    """The first image topic of ``bag`` and its message count."""
    from rosbags.rosbag2 import Reader

    with Reader(bag) as reader:
        for connection in reader.connections:
            if connection.msgtype in (IMAGE, COMPRESSED_IMAGE):
                return connection.topic, connection.msgcount
    raise ValueError(f"bag {bag} has no sensor_msgs/Image or CompressedImage topic")


def _parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="mosaic-ros-demo", description=__doc__.split("\n\n")[0])
    source = parser.add_mutually_exclusive_group()
    source.add_argument(
        "--video", type=Path, help="video file (default: OpenCV's vtest.avi, else a synthetic clip)"
    )
    source.add_argument("--bag", type=Path, help="a ROS 2 bag with an image topic")
    parser.add_argument("--model", default="tiny-random:qwen2.5-vl")
    parser.add_argument("--policy", default="mosaic")
    parser.add_argument("--questions", nargs="+", default=list(DEFAULT_QUESTIONS), metavar="Q")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.add_argument("--fps", type=float, default=5.0, help="frames per second of video put in the bag")
    parser.add_argument("--max-frames", type=int, default=60, help="frames of video put in the bag")
    parser.add_argument("--max-side", type=int, default=448, help="longest side of the bag's frames, px")
    parser.add_argument("--sample-fps", type=float, default=2.0, help="the node's sample_fps")
    parser.add_argument("--max-new-tokens", type=int, default=24)
    parser.add_argument("--rate", type=float, default=1.0, help="playback speed")
    parser.add_argument("--timeout", type=float, default=120.0, help="seconds to wait for each stage")
    return parser.parse_args(argv)


def _log(args, text: str) -> None:
    if not args.json:
        print(text, flush=True)


def run_demo(args: argparse.Namespace, work: Path) -> DemoResult:
    import rclpy

    if args.bag is None:
        video = args.video or default_video(work)
        summary = video_to_bag(
            video, work / "bag", fps=args.fps, max_frames=args.max_frames, max_side=args.max_side
        )
        bag, source = summary.path, str(video)
        _log(
            args,
            f"video {video}: {summary.frames} frames {summary.width}x{summary.height} at {summary.fps:g} fps",
        )
    else:
        bag, source = args.bag, str(args.bag)
    topic, frames_in_bag = bag_camera_topic(bag)
    result = DemoResult(args.model, args.policy, source, topic)
    if args.model.startswith("tiny-random:"):
        result.note = TINY_NOTE
        _log(args, f"Note: {TINY_NOTE}\n")
    questions = list(args.questions)
    split = max(1, len(questions) // 2)
    during, after = questions[:split], questions[split:] or questions[:1]

    params = {
        "camera_topics": [topic],
        "camera_ids": [CAMERA_ID],
        "model": args.model,
        "policy": args.policy,
        "sample_fps": args.sample_fps,
        "max_new_tokens": args.max_new_tokens,
        "status_period_s": 0.5,
        "use_sim_time": True,
        # A camera's topic is best effort with depth 1; a replayed bag is better heard reliably
        # and queued, so that no frame is lost while DDS matches the player to the node or
        # while the node's callbacks wait for a busy CPU (the node still samples and drops
        # frames itself, and counts them).
        "qos_overrides": {topic: {"subscription": {"reliability": "reliable", "depth": 100}}},
    }
    node = start_stream_node(params, work, name="stream_node")
    player = None
    rclpy.init(args=[sys.argv[0]])
    client = AskClient(NODE_NAME, name="mosaic_demo")
    try:
        _log(args, f"starting the stream node ({args.model}, policy {args.policy})...")
        node.wait_for_output(READY_MARK, args.timeout)
        client.wait_for_server(args.timeout)
        play_args = ["play", str(bag), "--clock", "--rate", str(args.rate), "--wait-subscribers", "1"]
        player = ModuleProcess("bag_tool", play_args, work, name="player")
        _log(args, f"playing {frames_in_bag} frames on {topic}; asking once half of them arrived...")

        def halfway() -> bool:
            status = client.status.get(CAMERA_ID)
            return (
                status is not None
                and status.frames_received >= frames_in_bag // 2
                and status.frames_ingested > 0
            )

        if not client.spin_until(halfway, args.timeout):
            raise RuntimeError(f"the node ingested no frames within {args.timeout:.0f} s:\n{node.stderr()}")
        for question in during:
            result.answers.append(_ask(args, client, question, "during playback"))
        if player.wait(args.timeout) != 0:
            raise RuntimeError(f"bag playback failed:\n{player.stderr()}")
        result.frames_published = _published(player.stdout())
        client.status.clear()
        if not client.spin_until(lambda: _settled(client, result.frames_published), SETTLE_TIMEOUT_S):
            _log(args, "note: not every published frame reached the node (best-effort transport)")
        _log(args, "\nplayback ended; asking about the whole video...")
        for question in after:
            result.answers.append(_ask(args, client, question, "after playback"))
        client.status.clear()
        client.spin_until(lambda: CAMERA_ID in client.status, args.timeout)
        result.status = _status_dict(client.status[CAMERA_ID])
    finally:
        client.close()
        rclpy.try_shutdown()
        if player is not None:
            player.stop()
        node.stop()
    return result


def _published(player_output: str) -> int:
    """Messages the player reports it published ("published N messages on TOPIC")."""
    return sum(int(line.split()[1]) for line in player_output.splitlines() if line.startswith("published "))


def _settled(client: AskClient, published: int) -> bool:
    """Every published frame arrived and each sampled one was ingested or dropped."""
    status = client.status.get(CAMERA_ID)
    return (
        status is not None
        and status.frames_received == published
        and status.frames_ingested + status.frames_dropped_busy + status.frames_dropped_invalid
        >= status.frames_sampled
    )


def _ask(args, client: AskClient, question: str, phase: str) -> dict:
    response = client.ask(make_request(question, CAMERA_ID), args.timeout)
    entry = {
        "phase": phase,
        "question": question,
        "success": response.success,
        "answer": response.answer,
        "error": response.error,
        "stats": stats_dict(response.stats),
    }
    if not args.json:
        print(f"\nQ ({phase}): {question}")
        print(f"A: {response.answer}" if response.success else f"error: {response.error}")
        print(format_stats(entry["stats"]))
    return entry


def _rounded(value, digits: int = 3):
    """``value`` with every float rounded (ms to the microsecond is plenty)."""
    if isinstance(value, float):
        return round(value, digits)
    if isinstance(value, dict):
        return {k: _rounded(v, digits) for k, v in value.items()}
    if isinstance(value, list):
        return [_rounded(v, digits) for v in value]
    return value


def _status_dict(msg) -> dict:
    fields = msg.get_fields_and_field_types()
    return {name: getattr(msg, name) for name in fields if name != "header"}


def main(argv: list[str] | None = None) -> int:
    args = _parse(sys.argv[1:] if argv is None else argv)
    isolate_ros_environment()
    with tempfile.TemporaryDirectory(prefix="mosaic_ros_demo_") as tmp:
        try:
            result = run_demo(args, Path(tmp))
        except (RuntimeError, ValueError) as error:
            print(f"mosaic-ros-demo: {error}", file=sys.stderr)
            return 1
        except KeyboardInterrupt:
            return 130
    if args.json:
        print(json.dumps(_rounded(vars(result)), indent=2))
    else:
        print(f"\nmodel {result.model}, policy {result.policy}; stream status at the end:")
        for name, value in result.status.items():
            print(f"  {name:<24} {value}")
        if result.note:
            print(f"\nNote: {result.note}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
