"""Starting the stream node and the bag player as separate processes (the demo and the tests).

Children run ``sys.executable -m mosaic_ros.nodes.<module>``, so they need no console script
and use the same interpreter (and ROS environment) as the caller.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import yaml


def isolate_ros_environment(default_domain_id: int | None = None) -> None:
    """Keep DDS traffic of this process and its children on this machine.

    Sets ``ROS_AUTOMATIC_DISCOVERY_RANGE=LOCALHOST`` and, unless ``ROS_DOMAIN_ID`` is set
    already, a domain id (``default_domain_id`` or one from the process id, in 1..100).
    Call before ``rclpy.init()``.
    """
    os.environ["ROS_AUTOMATIC_DISCOVERY_RANGE"] = "LOCALHOST"
    os.environ.pop("ROS_STATIC_PEERS", None)
    if not os.environ.get("ROS_DOMAIN_ID"):
        domain_id = default_domain_id if default_domain_id is not None else os.getpid() % 100 + 1
        os.environ["ROS_DOMAIN_ID"] = str(domain_id)


def write_params_file(path: Path, params: dict) -> Path:
    """A ROS 2 parameters file that applies ``params`` to every node."""
    path.write_text(yaml.safe_dump({"/**": {"ros__parameters": params}}, sort_keys=False))
    return path


class PythonProcess:
    """``python ARGS`` (this interpreter, this environment) with stdout and stderr in files.

    Files (not pipes) so that a chatty child never blocks. ``stop()`` sends SIGINT, as
    Ctrl-C would, and kills the child only if it does not exit in time.
    """

    def __init__(self, argv: list[str], log_dir: Path, name: str):
        self.name = name
        log_dir.mkdir(parents=True, exist_ok=True)
        self.stdout_path = log_dir / f"{name}.out"
        self.stderr_path = log_dir / f"{name}.err"
        self._stdout = open(self.stdout_path, "wb")  # noqa: SIM115 - closed in stop()
        self._stderr = open(self.stderr_path, "wb")  # noqa: SIM115 - closed in stop()
        self.process = subprocess.Popen(
            [sys.executable, *argv],
            stdin=subprocess.DEVNULL,
            stdout=self._stdout,
            stderr=self._stderr,
            env=dict(os.environ),
        )

    def stdout(self) -> str:
        return self.stdout_path.read_text(errors="replace")

    def stderr(self) -> str:
        return self.stderr_path.read_text(errors="replace")

    def output(self) -> str:
        """Both streams, for failure messages."""
        return f"{self.stdout()}{self.stderr()}"

    def running(self) -> bool:
        return self.process.poll() is None

    def wait_for_output(self, text: str, timeout: float, stream: str = "stderr") -> None:
        """Wait until ``text`` appears in the child's stderr (or stdout); raises
        ``RuntimeError`` with the child's output if it exits or the time runs out first."""
        read = self.stderr if stream == "stderr" else self.stdout
        deadline = time.monotonic() + timeout
        while text not in read():
            if not self.running():
                raise RuntimeError(f"{self.name} exited ({self.process.returncode}):\n{self.stderr()}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"no {text!r} from {self.name} after {timeout:.0f} s:\n{self.stderr()}")
            time.sleep(0.05)

    def wait(self, timeout: float) -> int:
        return self.process.wait(timeout=timeout)

    def stop(self, timeout: float = 10.0) -> int:
        """SIGINT, then SIGKILL after ``timeout`` s; returns the exit status."""
        if self.running():
            self.process.send_signal(signal.SIGINT)
            try:
                self.process.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self._stdout.close()
        self._stderr.close()
        return self.process.returncode

    def __enter__(self) -> PythonProcess:
        return self

    def __exit__(self, *exc_info) -> None:
        self.stop()


class ModuleProcess(PythonProcess):
    """``python -m mosaic_ros.nodes.<module> ARGS`` (no console script needed)."""

    def __init__(self, module: str, args: list[str], log_dir: Path, name: str | None = None):
        super().__init__(["-m", f"mosaic_ros.nodes.{module}", *args], log_dir, name or module)


def start_stream_node(
    params: dict, work_dir: Path, name: str = "stream_node", extra_args: tuple[str, ...] = ()
) -> ModuleProcess:
    """The stream node with ``params`` (written to a params file in ``work_dir``);
    ``extra_args`` follow, e.g. ``("--ros-args", "-p", "sample_fps:=4.0")``."""
    params_file = write_params_file(work_dir / f"{name}.yaml", params)
    return ModuleProcess("stream_main", ["--params", str(params_file), *extra_args], work_dir, name=name)


# What the stream node logs once it serves questions.
READY_MARK = "ready: policy"
