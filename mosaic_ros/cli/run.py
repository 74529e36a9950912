"""``mosaic-ros-run``: run the streaming runtime offline over a video file, no ROS involved.

    mosaic-ros-run --video clip.avi --model tiny-random:qwen2.5-vl --sample-fps 2 \
        --ask "What happened?" --ask "Who walked by?" --policy dense --json

The session's settings are flags derived from the configuration tree (``runtime.config``:
``--budget-tokens``, ``--compression``, ``--option KEY=VALUE`` for the policy's options...).
``--save DIR`` snapshots the stream after the questions, ``--load DIR`` restores one first.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import sys
import time

import torch
from tqdm import tqdm

from mosaic_ros.runtime import config
from mosaic_ros.runtime.heap import freeze_startup_objects
from mosaic_ros.runtime.models import load_model
from mosaic_ros.runtime.models.smollm2 import SMOLLM2_PREFIX
from mosaic_ros.runtime.session import SessionConfig, StreamSession, TimeWindow
from mosaic_ros.runtime.snapshot import SnapshotError
from mosaic_ros.runtime.video import sampled_frames, video_info

# The session's settings are flags derived from the tree (``runtime.config``), at these defaults.
RUN_DEFAULTS = SessionConfig(max_new_tokens=32)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="mosaic-ros-run", description=__doc__.split("\n\n")[0])
    p.add_argument("--video", required=True, help="video file OpenCV can read")
    config.add_arguments(p.add_argument_group("model"), config.ModelConfig())
    config.add_arguments(p.add_argument_group("session (the configuration tree)"), RUN_DEFAULTS)
    p.add_argument(
        "--option",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="an option of --policy, e.g. run_penalty=0.5 (repeatable)",
    )
    p.add_argument("--sample-fps", type=float, default=2.0, help="frames per second taken from the video")
    p.add_argument("--max-frames", type=int, default=None, help="stop after this many sampled frames")
    p.add_argument("--max-side", type=int, default=448, help="shrink frames so the longest side fits (px)")
    p.add_argument("--ask", action="append", default=[], help="question asked after ingesting (repeatable)")
    p.add_argument("--window-seconds", type=float, default=0.0, help="only consider the last N seconds")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0 = torch's default)")
    p.add_argument("--json", action="store_true", help="print one JSON document instead of text")
    p.add_argument(
        "--load",
        metavar="DIR",
        help="first restore the stream snapshot in DIR (same model and policy); the video's "
        "stamps then continue after the restored stream's last one",
    )
    p.add_argument(
        "--save", metavar="DIR", help="snapshot the stream into DIR at the end, after the questions"
    )
    return p


def ingest_milestones(ingest_ms: list[float], milestones=(10, 100, 500, 1000), span: int = 10) -> dict:
    """Median ingest ms over the ``span`` frames ending at each milestone the run reached."""
    return {str(m): statistics.median(ingest_ms[m - span : m]) for m in milestones if len(ingest_ms) >= m}


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    try:
        model = config.from_arguments(config.ModelConfig(), args)
        session_config = config.from_arguments(
            RUN_DEFAULTS, args, policy_options=config.parse_options(args.policy, args.option)
        )
        info = video_info(args.video)
        adapter = load_model(
            model.model,
            device=model.device,
            dtype=model.dtype,
            seed=model.seed,
            pair_frames=model.pair_frames,
        )
        session = StreamSession(adapter, session_config)
        restored = session.load(args.load) if args.load else None
    except (OSError, ValueError, SnapshotError) as exc:
        print(f"mosaic-ros-run: {exc}", file=sys.stderr)
        return 2
    freeze_startup_objects()
    offset = 0.0
    if restored is not None:
        for message in restored.refused:
            print(f"mosaic-ros-run: {message}", file=sys.stderr)
        if session.last_stamp is not None:
            offset = session.last_stamp + 1.0 / args.sample_fps

    expected = int(info.frame_count / info.fps * args.sample_fps) + 1 if info.frame_count > 0 else None
    if args.max_frames is not None:
        expected = min(expected or args.max_frames, args.max_frames)
    ingest_ms: list[float] = []
    t0 = time.perf_counter()
    frames = sampled_frames(args.video, args.sample_fps, args.max_frames, args.max_side)
    for stamp, rgb in tqdm(frames, total=expected, desc="ingest", unit="frame", file=sys.stderr):
        r = session.ingest(rgb, offset + stamp)
        ingest_ms.append(r.vision_encode_ms + r.prefill_ms + r.maintain_ms)
    ingest_s = time.perf_counter() - t0

    answers = []
    for question in args.ask:
        window = None
        if args.window_seconds > 0 and session.last_stamp is not None:
            window = TimeWindow.last(args.window_seconds, session.last_stamp)
        ans = session.ask(question, window=window)
        answers.append({"question": question, "answer": ans.text, "stats": ans.stats.as_dict()})

    saved = None
    if args.save:
        try:
            saved = session.save(args.save)
        except SnapshotError as exc:
            print(f"mosaic-ros-run: {exc}", file=sys.stderr)
            return 2
    st = session.status()
    report = {
        "video": {
            "path": info.path,
            "fps": info.fps,
            "frames": info.frame_count,
            "size": [info.width, info.height],
        },
        "model": args.model,
        "family": adapter.family,
        "policy": args.policy,
        "frames_ingested": st.frames_ingested,
        "tokens_in_memory": st.tokens_in_memory,
        "host_kv_bytes": st.host_kv_bytes,
        "stream_seconds": st.stream_seconds,
        "ingest_seconds": ingest_s,
        "ingest_ms_per_frame": statistics.median(ingest_ms) if ingest_ms else 0.0,
        "ingest_ms_at_frame": ingest_milestones(ingest_ms),
        "answers": answers,
    }
    if restored is not None:
        report["restored"] = dataclasses.asdict(restored)
    if saved is not None:
        report["saved"] = dataclasses.asdict(saved)
    if args.model.startswith("tiny-random:"):
        report["note"] = "tiny-random model: answers are not meaningful, every stage is real"
    elif args.model.startswith(SMOLLM2_PREFIX):
        report["note"] = (
            "real SmolLM2-135M-Instruct language model with a random vision tower: "
            "it answers text questions, the pixels mean nothing to it"
        )
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        print(f"{st.frames_ingested} frames, {st.tokens_in_memory} tokens in memory, policy {args.policy}")
        for a in answers:
            s = a["stats"]
            print(f"Q: {a['question']}\nA: {a['answer']}")
            print(
                f"   ttft {s['ttft_ms']:.1f} ms, total {s['total_ms']:.1f} ms, {s['tokens_generated']} tokens"
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
