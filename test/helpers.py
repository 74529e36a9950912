"""Helpers for tests that wait on real events (processes, DDS discovery, ROS callbacks).

Tests never sleep and then assert: they wait for the awaited condition with a deadline and
fail with a message that says what did not happen.
"""

from __future__ import annotations

import re
import struct
import time
import zlib
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

from mosaic_ros.runtime.stats import LatencyStats

T = TypeVar("T")

TEST_DIR = Path(__file__).resolve().parent


def wait_for(predicate: Callable[[], T], timeout: float, what: str, interval: float = 0.02) -> T:
    """Poll ``predicate`` until it returns a truthy value, and return that value.

    ``timeout`` and ``interval`` are seconds. Raises ``AssertionError`` naming ``what`` when
    the deadline passes first.
    """
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() >= deadline:
            raise AssertionError(f"timed out after {timeout:.1f} s waiting for {what}")
        time.sleep(interval)


class ListLog:
    """The rclpy logger's ``info``/``warning``/``error``, keeping every line (for ROS-free tests)."""

    def __init__(self):
        self.lines: list[str] = []

    def info(self, text):
        self.lines.append(text)

    warning = error = info


def spin_until(executor, predicate: Callable[[], T], timeout: float, what: str) -> T:
    """Like :func:`wait_for`, spinning ``executor`` (an rclpy executor) between checks."""

    def spun() -> T:
        executor.spin_once(timeout_sec=0.02)
        return predicate()

    return wait_for(spun, timeout, what, interval=0.0)


def distinct_latency_stats() -> LatencyStats:
    """Stats whose every field holds a value no other field holds.

    Integers exceed 32 bits where the message field is 64 bits wide; the float32 field holds
    a value a float32 represents exactly.
    """
    return LatencyStats(
        policy="mosaic",
        queue_ms=0.5,
        vision_encode_ms=1.25,
        retrieval_ms=2.125,
        transfer_ms=3.0625,
        prefill_ms=4.5,
        ttft_ms=5.75,
        decode_ms=6.875,
        total_ms=7.9375,
        tokens_generated=11,
        frames_in_memory=12,
        tokens_in_memory=2**40 + 13,
        device_kv_bytes=2**41 + 14,
        host_kv_bytes=2**42 + 15,
        clusters_in_memory=2**32 - 1,
        tokens_retrieved=2**43 + 17,
        bytes_moved=2**64 - 1,
        copies=19,
        prefetch_hit_rate=0.625,
        tokens_evicted=2**44 + 21,
        disk_fetch_ms=8.96875,
        disk_bytes_read=2**45 + 23,
        disk_kv_bytes=2**46 + 24,
    )


README = TEST_DIR.parent / "README.md"
REFUSALS_SECTION = "### What the node refuses, and how"
# Placeholders the README uses in error texts (numbers, names, an exception's type and words).
_PLACEHOLDER = re.compile(r"WxH|\b(?:N|M|W|H|S|X|A|B|C|D|TYPE|MESSAGE|ENCODING|ID|IDS|NAME|REASON)\b")


def documented_refusals() -> list[re.Pattern]:
    """The error texts of the README's "What the node refuses" section (every backticked text of
    it), each as a pattern in which the placeholders match any value."""
    section = README.read_text().split(REFUSALS_SECTION, 1)[1].split("\n### ", 1)[0]
    texts = re.findall(r"`([^`]+)`", section.replace("\n", " "))
    patterns = []
    for text in texts:
        parts = _PLACEHOLDER.split(text)
        patterns.append(re.compile(".+?".join(re.escape(part) for part in parts)))
    return patterns


def assert_documented(message: str) -> None:
    """Fail unless the README's refusals section has a text that ``message`` is an instance of."""
    assert any(p.fullmatch(message) for p in documented_refusals()), (
        f"README's {REFUSALS_SECTION!r} does not list {message!r}"
    )


def png_declaring(width: int, height: int) -> bytes:
    """A valid PNG header declaring ``width`` x ``height`` RGB pixels, with almost no pixel data:
    a decompression bomb's shape (under 100 bytes, whatever size it declares)."""

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", header)
        + chunk(b"IDAT", zlib.compress(bytes(16)))
        + chunk(b"IEND", b"")
    )
