"""Entry point of the ``mosaic_stream`` node: load the model, start the node, spin, shut down.

Run: ``mosaic-ros-stream --params config/stream.yaml [--ros-args -p key:=value ...]``
(``--params FILE`` is handed to rclpy as ``--ros-args --params-file FILE``).

Signals are handled before anything heavy is imported, so Ctrl-C at any moment, even while
torch loads, ends the process with status 0 and no traceback. The first SIGINT or SIGTERM
stops the node (answers in flight are cancelled and their clients told); later ones, such
as the second SIGINT ``ros2 launch`` forwards after the terminal's, are ignored.
"""

from __future__ import annotations

import faulthandler
import os
import signal
import sys
import time

SPIN_PERIOD_S = 0.2
# On shutdown: at most this long for answers in flight to stop, then this many more turns
# of the executor to send their replies.
DRAIN_S = 2.0
DRAIN_SPINS = 4


class StartError(Exception):
    """The node cannot start; the message says why and what to change."""


class Interrupts:
    """SIGINT and SIGTERM: the first raises ``KeyboardInterrupt`` in the main thread (also where
    the shell started the process with SIGINT ignored, as it does for background jobs); any
    later one, or one after ``shutting_down()``, is only counted."""

    def __init__(self):
        self.received = 0
        self._raise = True
        for signum in (signal.SIGINT, signal.SIGTERM):
            signal.signal(signum, self._handle)

    def _handle(self, _signum, _frame) -> None:
        self.received += 1
        if self._raise:
            self._raise = False
            raise KeyboardInterrupt

    def shutting_down(self) -> None:
        """From now on signals no longer interrupt: the shutdown in progress must finish."""
        self._raise = False


def ros_arguments(argv: list[str]) -> list[str]:
    """``argv`` with ``--params FILE`` turned into ``--ros-args --params-file FILE``, placed
    before any ``--ros-args`` the user gave so that their ``-p key:=value`` take precedence."""
    argv = list(argv)
    files: list[str] = []
    while "--params" in argv:
        i = argv.index("--params")
        if i + 1 >= len(argv):
            raise StartError("--params needs a YAML file")
        files.append(argv[i + 1])
        del argv[i : i + 2]
    if not files:
        return argv
    head = argv[:1]
    extra = [arg for f in files for arg in ("--params-file", f)]
    return [*head, "--ros-args", *extra, "--", *argv[1:]]


def check_params_file(path: str) -> None:
    """``StartError`` unless ``path`` is a readable YAML file holding a mapping."""
    import yaml

    try:
        with open(path, encoding="utf-8") as f:
            content = yaml.safe_load(f)
    except OSError as error:
        raise StartError(f"params file {path!r}: {error.strerror}") from None
    except yaml.YAMLError as error:
        raise StartError(f"params file {path!r} is not valid YAML: {error}") from None
    if not isinstance(content, dict):
        raise StartError(f"params file {path!r} holds no parameters (a YAML mapping of node names)")


def main(args: list[str] | None = None) -> None:
    """Process entry point: runs the node until Ctrl-C or SIGTERM, then exits the process
    (status 0, or 1 when the node cannot start)."""
    faulthandler.enable()  # a crash in native code prints every thread's Python stack to stderr
    interrupts = Interrupts()
    print("mosaic_stream: starting", file=sys.stderr, flush=True)
    try:
        code = _run(sys.argv if args is None else args, interrupts)
    except BaseException as error:  # during startup: nothing to clean up beyond what _run did
        if not interrupted(error):
            raise
        code = 0
    _exit_now(code)


def interrupted(error: BaseException) -> bool:
    """Whether ``error`` is, or was caused by, the ``KeyboardInterrupt`` of a signal: one that
    strikes while a C extension initialises comes back as that extension's ``ImportError``
    (rclpy's "initialization failed"), the interrupt as its cause."""
    seen: set[int] = set()
    while error is not None and id(error) not in seen:
        if isinstance(error, KeyboardInterrupt):
            return True
        seen.add(id(error))
        error = error.__cause__ or error.__context__
    return False


def _run(argv: list[str], interrupts: Interrupts) -> int:
    import rclpy
    from rclpy.exceptions import NameValidationException, ParameterException
    from rclpy.logging import get_logger
    from rclpy.signals import SignalHandlerOptions

    log = get_logger("mosaic_stream")
    try:
        ros_argv = ros_arguments(argv)
        for i, arg in enumerate(ros_argv[:-1]):
            if arg == "--params-file":
                check_params_file(ros_argv[i + 1])
        # rclpy's own signal handlers would shut the context down at once, before answers in
        # flight are cancelled and their clients told; the node does that itself on Ctrl-C.
        rclpy.init(args=ros_argv, signal_handler_options=SignalHandlerOptions.NO)
    except (StartError, RuntimeError) as error:  # rclpy's RCLError is a RuntimeError
        if interrupted(error):
            return 0
        log.fatal(f"cannot start: {error}")
        return 1
    try:
        node = _start_node(log)
    except (StartError, ValueError, ParameterException, NameValidationException) as error:
        stopped = interrupted(error)
        if not stopped:
            log.fatal(f"cannot start: {error}")
        rclpy.try_shutdown()
        return 0 if stopped else 1
    except KeyboardInterrupt:
        interrupts.shutting_down()
        rclpy.try_shutdown()
        return 0
    return _spin(node, interrupts)


def _start_node(log):
    """The node, parameters checked, model loaded, sessions made and wired."""
    from mosaic_ros.nodes.stream_node import StreamNode
    from mosaic_ros.runtime.heap import freeze_startup_objects
    from mosaic_ros.runtime.models import ModelLoadError, load_model
    from mosaic_ros.runtime.session import SessionError, StreamSession

    node = StreamNode()
    try:
        settings, vlm = node.settings, node.settings.config.vlm
        log.info(f"loading model {vlm.model!r} on device {vlm.device!r}")
        try:
            adapter = load_model(vlm.model, vlm.device, vlm.dtype, vlm.seed, pair_frames=vlm.pair_frames)
        except ModelLoadError as error:
            raise StartError(str(error)) from None
        except RuntimeError as error:  # torch's words: a device it does not know, out of memory...
            raise StartError(f"model {vlm.model!r} on device {vlm.device!r}: {error}") from None
        if vlm.model.startswith("tiny-random:"):
            log.warning("tiny-random model: random weights, answers are not meaningful")
        try:
            sessions = {
                camera_id: StreamSession(adapter, settings.config.session)
                for camera_id in settings.camera_ids
            }
        except SessionError as error:
            raise StartError(str(error)) from None
        freeze_startup_objects()  # full GC passes would walk the model's objects (~200 ms stalls)
        node.start(sessions)
    except BaseException:
        node.destroy_node()
        raise
    return node


def _spin(node, interrupts: Interrupts) -> int:
    import rclpy
    from rclpy.executors import ExternalShutdownException, MultiThreadedExecutor

    executor = MultiThreadedExecutor(num_threads=node.executor_threads)
    executor.add_node(node)
    try:
        # A bounded wait, so that Ctrl-C is seen within SPIN_PERIOD_S even when nothing arrives.
        while rclpy.ok():
            executor.spin_once(timeout_sec=SPIN_PERIOD_S)
    except (KeyboardInterrupt, ExternalShutdownException):
        pass
    finally:
        interrupts.shutting_down()
        node.close()
        _drain(node, executor)
        executor.shutdown(timeout_sec=5.0)
        node.destroy_node()
        rclpy.try_shutdown()
    return 0


def _drain(node, executor) -> None:
    """Keep spinning while cancelled answers wind down, so that their clients get a reply
    (action results are sent from executor callbacks)."""
    from rclpy.executors import ExternalShutdownException

    deadline = time.monotonic() + DRAIN_S
    try:
        while node.pending_questions and time.monotonic() < deadline:
            executor.spin_once(timeout_sec=0.05)
        for _ in range(DRAIN_SPINS):
            executor.spin_once(timeout_sec=0.05)
    except ExternalShutdownException:
        pass


def _exit_now(code: int) -> None:
    """Exit without the interpreter's teardown of torch and transformers, which takes
    seconds; ROS is shut down and nothing is left to flush but stdio."""
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


if __name__ == "__main__":
    main()
