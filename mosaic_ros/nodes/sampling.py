"""Frame sampling by timestamp, shared by the stream node and the bag tool."""

from __future__ import annotations

import math


class FrameSampler:
    """Keeps frames at ``fps`` by their stamps: a frame is due when it starts a new 1/fps tick.

    Ticks count from the first kept frame, so a 10 fps source sampled at 4 fps keeps frames
    at 0, 0.3, 0.5, 0.8, 1.0 s...: exactly 4 per second over time, never two in one tick.
    """

    def __init__(self, fps: float):
        self.fps = fps
        self.reset()

    def reset(self) -> None:
        self._origin: float | None = None
        self._last_tick = -1

    @property
    def fps(self) -> float:
        return self._fps

    @fps.setter
    def fps(self, value: float) -> None:
        if not value > 0:
            raise ValueError(f"sample rate must be > 0 fps, got {value}")
        self._fps = float(value)
        self.reset()

    def _tick(self, stamp: float) -> int:
        return math.floor((stamp - self._origin) * self._fps + 1e-6)

    def is_due(self, stamp: float) -> bool:
        return self._origin is None or self._tick(stamp) > self._last_tick

    def commit(self, stamp: float) -> None:
        """Record that the frame at ``stamp`` was kept."""
        if self._origin is None:
            self._origin = stamp
        self._last_tick = self._tick(stamp)
