"""``mosaic-ros-ask``: ask a running ``mosaic_stream`` node a question about its video.

    mosaic-ros-ask "What is the person in red doing?" [--camera ID] [--window SECONDS]
        [--max-new-tokens N] [--stream-tokens] [--timeout S] [--json] [--node /mosaic_stream]

Prints the answer and a latency table (or one JSON object with ``--json``). With
``--stream-tokens`` the action ``~/ask_stream`` is used and tokens print as they arrive;
Ctrl-C then cancels the answer. Exits non-zero, with the error on stderr, when the question
fails or no answer comes within the timeout.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable

import rclpy
from action_msgs.msg import GoalStatus
from rclpy.action import ActionClient
from rclpy.executors import SingleThreadedExecutor
from rclpy.node import Node
from rclpy.signals import SignalHandlerOptions

from mosaic_ros.action import AskVideo as AskVideoAction
from mosaic_ros.msg import StreamStatus
from mosaic_ros.runtime.stats import LatencyStats
from mosaic_ros.srv import AskVideo

# Stats printed with a unit suffix; the rest are counts or names.
_UNITS = {"_ms": "ms", "_bytes": "B", "bytes_moved": "B"}


class AskError(RuntimeError):
    """No answer: the node is not there, did not answer in time, or refused the question."""


def stats_dict(stats_msg) -> dict:
    """A ``LatencyStats`` message as a plain dict with the dataclass's field names."""
    return {name: getattr(stats_msg, name) for name in LatencyStats.field_names()}


def format_stats(stats: dict) -> str:
    """A two-column table of latency stats, times in ms with one decimal."""
    lines = []
    for name, value in stats.items():
        if isinstance(value, float):
            text = f"{value:.3f}" if name == "prefetch_hit_rate" else f"{value:.1f}"
        else:
            text = str(value)
        unit = next((u for suffix, u in _UNITS.items() if name.endswith(suffix)), "")
        lines.append(f"  {name:<20} {text:>14} {unit}".rstrip())
    return "\n".join(lines)


def make_request(
    question: str,
    camera: str = "",
    window_seconds: float = 0.0,
    max_new_tokens: int = 0,
    request_type=AskVideo.Request,
):
    return request_type(
        question=question,
        camera_id=camera,
        window_seconds=float(window_seconds),
        max_new_tokens=max_new_tokens,
    )


class AskClient(Node):
    """Client of one stream node: ``~/ask``, ``~/ask_stream`` and the latest ``~/status`` per stream."""

    def __init__(self, server: str = "/mosaic_stream", name: str = "mosaic_ask", context=None):
        super().__init__(name, context=context)
        server = server.rstrip("/")
        self.server = server
        self._ask = self.create_client(AskVideo, f"{server}/ask")
        self._ask_stream = ActionClient(self, AskVideoAction, f"{server}/ask_stream")
        self.status: dict[str, StreamStatus] = {}
        self.create_subscription(StreamStatus, f"{server}/status", self._on_status, 10)
        self.executor_ = SingleThreadedExecutor(context=context)
        self.executor_.add_node(self)

    def _on_status(self, msg: StreamStatus) -> None:
        self.status[msg.stream_id] = msg

    def spin_until(self, done: Callable[[], bool], timeout: float) -> bool:
        """Process callbacks until ``done()`` or ``timeout`` seconds; returns ``done()``."""
        deadline = time.monotonic() + timeout
        while not done() and time.monotonic() < deadline:
            self.executor_.spin_once(timeout_sec=min(0.05, max(0.0, deadline - time.monotonic())))
        return done()

    def wait_for_server(self, timeout: float, action: bool = False) -> None:
        if action:
            ready = self._ask_stream.wait_for_server(timeout_sec=timeout)
        else:
            ready = self._ask.wait_for_service(timeout_sec=timeout)
        if not ready:
            what = f"{self.server}/ask_stream" if action else f"{self.server}/ask"
            raise AskError(f"{what} is not available after {timeout:.0f} s; is mosaic_stream running?")

    def ask_async(self, request: AskVideo.Request):
        """Send the request; returns the future of its response (spin to complete it)."""
        return self._ask.call_async(request)

    def ask(self, request: AskVideo.Request, timeout: float) -> AskVideo.Response:
        """The service's response (success or not); AskError when none comes in time."""
        self.wait_for_server(timeout)
        future = self._ask.call_async(request)
        if not self.spin_until(future.done, timeout):
            self._ask.remove_pending_request(future)
            raise AskError(f"no answer from {self.server}/ask within {timeout:.0f} s")
        return future.result()

    def ask_stream(
        self,
        goal: AskVideoAction.Goal,
        timeout: float,
        on_feedback: Callable[[AskVideoAction.Feedback], None] | None = None,
        cancel_when: Callable[[], bool] | None = None,
    ) -> tuple[int, AskVideoAction.Result]:
        """Run the action to its end: (final GoalStatus, result).

        The goal is cancelled (and its partial answer returned) when ``cancel_when()`` turns
        true or on Ctrl-C (a second Ctrl-C gives up waiting).
        """
        self.wait_for_server(timeout, action=True)

        def feedback(msg) -> None:
            if on_feedback is not None:
                on_feedback(msg.feedback)

        sent = self._ask_stream.send_goal_async(goal, feedback_callback=feedback)
        if not self.spin_until(sent.done, timeout):
            raise AskError(f"{self.server}/ask_stream did not accept the goal within {timeout:.0f} s")
        handle = sent.result()
        if not handle.accepted:
            raise AskError(f"{self.server}/ask_stream rejected the goal")
        result = handle.get_result_async()
        deadline = time.monotonic() + timeout
        cancel_sent = False
        while not result.done():
            if time.monotonic() > deadline:
                handle.cancel_goal_async()
                raise AskError(f"no result from {self.server}/ask_stream within {timeout:.0f} s")
            try:
                if not cancel_sent and cancel_when is not None and cancel_when():
                    handle.cancel_goal_async()
                    cancel_sent = True
                self.executor_.spin_once(timeout_sec=0.05)
            except KeyboardInterrupt:
                if cancel_sent:
                    raise
                handle.cancel_goal_async()
                cancel_sent = True
        return result.result().status, result.result().result

    def close(self) -> None:
        self._ask_stream.destroy()
        self.executor_.shutdown()
        self.destroy_node()


def _parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="mosaic-ros-ask", description=__doc__.split("\n\n")[0])
    parser.add_argument("question")
    parser.add_argument(
        "--camera", default="", help="camera_id to ask about (default: the node's first camera)"
    )
    parser.add_argument("--window", type=float, default=0.0, help="only the last SECONDS of video (0: all)")
    parser.add_argument(
        "--max-new-tokens", type=int, default=0, help="answer length cap (0: the node's default)"
    )
    parser.add_argument(
        "--stream-tokens", action="store_true", help="use the action and print tokens as they come"
    )
    parser.add_argument(
        "--timeout", type=float, default=60.0, help="seconds to wait for the node and the answer"
    )
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of text")
    parser.add_argument("--node", default="/mosaic_stream", help="full name of the stream node")
    return parser.parse_args(argv)


def _run(args: argparse.Namespace, client: AskClient) -> int:
    if not args.stream_tokens:
        request = make_request(args.question, args.camera, args.window, args.max_new_tokens)
        response = client.ask(request, args.timeout)
        return _report(
            args, response.success, response.answer, response.error, response.stats, cancelled=False
        )

    printed = ""

    def on_feedback(feedback) -> None:
        nonlocal printed
        if not args.json and feedback.partial_answer.startswith(printed):
            sys.stdout.write(feedback.partial_answer[len(printed) :])
            sys.stdout.flush()
            printed = feedback.partial_answer

    goal = make_request(
        args.question, args.camera, args.window, args.max_new_tokens, request_type=AskVideoAction.Goal
    )
    status, result = client.ask_stream(goal, args.timeout, on_feedback)
    if not args.json and printed:
        sys.stdout.write("\n")
    cancelled = status == GoalStatus.STATUS_CANCELED
    return _report(args, result.success, result.answer, result.error, result.stats, cancelled=cancelled)


def _report(args, success: bool, answer: str, error: str, stats_msg, cancelled: bool) -> int:
    stats = stats_dict(stats_msg)
    if args.json:
        print(
            json.dumps(
                {"success": success, "answer": answer, "error": error, "cancelled": cancelled, "stats": stats}
            )
        )
    else:
        if success and not args.stream_tokens:
            print(answer)
        print(format_stats(stats))
    if not success:
        print(f"mosaic-ros-ask: {error or 'failed'}", file=sys.stderr)
        return 1
    return 0


def main(argv: list[str] | None = None) -> int:
    args = _parse(sys.argv[1:] if argv is None else argv)
    # Ctrl-C reaches us as KeyboardInterrupt with the context still up, so a streamed
    # answer can be cancelled on the node before exiting.
    rclpy.init(args=[sys.argv[0]], signal_handler_options=SignalHandlerOptions.NO)
    client = AskClient(args.node)
    try:
        return _run(args, client)
    except AskError as error:
        print(f"mosaic-ros-ask: {error}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    finally:
        client.close()
        rclpy.try_shutdown()


if __name__ == "__main__":
    sys.exit(main())
