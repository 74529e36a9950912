"""A stand-in for the stream node's question interfaces, for tests across processes.

Serves ``<namespace>/ask`` as the AskVideo service and as the AskVideo action. The service
answers with the request's fields as JSON (so the caller can check what crossed the wire),
followed by a non-ASCII suffix, and stats from ``helpers.distinct_latency_stats()``. An
empty question fails. The action "generates" ``max_new_tokens`` words (8 when 0), one per
``STEP_S``, with a feedback message per word, and honours cancel between words.

Run: ``python ask_video_server.py --namespace /t_1234``. Exits 0 on SIGINT.
"""

from __future__ import annotations

import argparse
import json
import time

import rclpy
from helpers import distinct_latency_stats
from mosaic_ros.action import AskVideo as AskVideoAction
from mosaic_ros.msg import LatencyStats as LatencyStatsMsg
from mosaic_ros.srv import AskVideo
from rclpy.action import ActionServer, CancelResponse, GoalResponse
from rclpy.callback_groups import ReentrantCallbackGroup
from rclpy.executors import ExternalShutdownException, MultiThreadedExecutor
from rclpy.node import Node

ANSWER_SUFFIX = " — réponse ✓ 映像 🤖"
WORDS = ("un", "robot", "a", "traversé", "la", "pièce", "→", "卓")
DEFAULT_TOKENS = 8
STEP_S = 0.02


def request_fields(request) -> dict:
    """The request fields the service echoes, as plain JSON values."""
    return {
        "question": request.question,
        "camera_id": request.camera_id,
        "window_seconds": request.window_seconds,
        "window_start": [request.window_start.sec, request.window_start.nanosec],
        "window_end": [request.window_end.sec, request.window_end.nanosec],
        "max_new_tokens": request.max_new_tokens,
    }


def answer_words(count: int) -> list[str]:
    return [WORDS[i % len(WORDS)] for i in range(count)]


class AskVideoServer(Node):
    def __init__(self, namespace: str) -> None:
        super().__init__("ask_video_server", namespace=namespace)
        group = ReentrantCallbackGroup()
        self.create_service(AskVideo, "ask", self._ask, callback_group=group)
        self._action = ActionServer(
            self,
            AskVideoAction,
            "ask",
            execute_callback=self._execute,
            goal_callback=lambda goal: GoalResponse.ACCEPT,
            cancel_callback=lambda goal_handle: CancelResponse.ACCEPT,
            callback_group=group,
        )

    def _ask(self, request: AskVideo.Request, response: AskVideo.Response) -> AskVideo.Response:
        if not request.question:
            response.success = False
            response.error = "question is empty"
            return response
        response.success = True
        response.answer = json.dumps(request_fields(request), ensure_ascii=False) + ANSWER_SUFFIX
        response.stats = LatencyStatsMsg(**distinct_latency_stats().as_dict())
        return response

    def _execute(self, goal_handle) -> AskVideoAction.Result:
        count = goal_handle.request.max_new_tokens or DEFAULT_TOKENS
        words: list[str] = []
        while len(words) < count:
            if goal_handle.is_cancel_requested:
                goal_handle.canceled()
                return self._result(words, success=False, error="cancelled")
            words = answer_words(len(words) + 1)
            goal_handle.publish_feedback(
                AskVideoAction.Feedback(
                    stage="decoding", partial_answer=" ".join(words), tokens_generated=len(words)
                )
            )
            time.sleep(STEP_S)
        goal_handle.succeed()
        return self._result(words, success=True, error="")

    @staticmethod
    def _result(words: list[str], success: bool, error: str) -> AskVideoAction.Result:
        stats = distinct_latency_stats()
        stats.tokens_generated = len(words)
        return AskVideoAction.Result(
            success=success,
            answer=" ".join(words),
            error=error,
            stats=LatencyStatsMsg(**stats.as_dict()),
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--namespace", required=True)
    args = parser.parse_args()
    rclpy.init()
    node = None
    executor = MultiThreadedExecutor(num_threads=4)
    try:
        node = AskVideoServer(args.namespace)
        executor.add_node(node)
        executor.spin()
    except (KeyboardInterrupt, ExternalShutdownException):
        pass
    finally:
        executor.shutdown()
        if node is not None:
            node.destroy_node()
        rclpy.try_shutdown()


if __name__ == "__main__":
    main()
