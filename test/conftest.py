"""Isolation for every test that touches ROS 2, set up before any test calls ``rclpy.init``.

- ``ROS_AUTOMATIC_DISCOVERY_RANGE=LOCALHOST``: no DDS packet leaves the loopback interface.
- ``ROS_DOMAIN_ID``: one per test run, spread over 1..100 from the process id and the clock,
  so parallel runs on one machine do not see each other. Set ``MOSAIC_ROS_TEST_DOMAIN_ID``
  to choose it (for example to watch a run with ``ros2 topic echo`` from another shell).
- ``ROS_HOME`` and ``ROS_LOG_DIR``: a temporary folder of this run, removed at exit, so
  tests write nothing under ``~/.ros``.

These are environment variables, so processes that tests start inherit them. Helpers for
waiting on real events live in ``helpers.py`` next to this file.

Tests marked ``cuda`` need a CUDA device; where torch sees none they are skipped with that
reason (``scripts/gpu_check`` runs them on a GPU machine and fails if any is skipped there).
"""

from __future__ import annotations

import atexit
import os
import shutil
import tempfile
import time

import pytest


def _test_domain_id() -> int:
    chosen = os.environ.get("MOSAIC_ROS_TEST_DOMAIN_ID")
    if chosen:
        domain_id = int(chosen)
        if not 0 <= domain_id <= 232:
            raise ValueError(f"MOSAIC_ROS_TEST_DOMAIN_ID must be in 0..232, got {domain_id}")
        return domain_id
    return (os.getpid() * 7919 + time.time_ns() // 1_000_000) % 100 + 1


def _isolate_ros() -> None:
    ros_home = tempfile.mkdtemp(prefix="mosaic_ros_test_")
    atexit.register(shutil.rmtree, ros_home, ignore_errors=True)
    os.environ["ROS_AUTOMATIC_DISCOVERY_RANGE"] = "LOCALHOST"
    os.environ.pop("ROS_STATIC_PEERS", None)
    os.environ["ROS_DOMAIN_ID"] = str(_test_domain_id())
    os.environ["ROS_HOME"] = ros_home
    os.environ["ROS_LOG_DIR"] = os.path.join(ros_home, "log")


_isolate_ros()


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    import torch

    if torch.cuda.is_available():
        return
    no_gpu = pytest.mark.skip(reason="needs a CUDA device (run scripts/gpu_check on a GPU machine)")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(no_gpu)


def pytest_report_header(config: pytest.Config) -> str:
    return (
        f"ROS_DOMAIN_ID={os.environ['ROS_DOMAIN_ID']} "
        f"ROS_AUTOMATIC_DISCOVERY_RANGE={os.environ['ROS_AUTOMATIC_DISCOVERY_RANGE']}"
    )


@pytest.fixture
def ros_context():
    """A fresh rclpy context for one test, shut down afterwards (other tests keep theirs)."""
    import rclpy
    from rclpy.context import Context

    context = Context()
    rclpy.init(context=context)
    try:
        yield context
    finally:
        if context.ok():
            rclpy.shutdown(context=context)
