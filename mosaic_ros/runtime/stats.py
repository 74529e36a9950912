"""Per-answer latency and memory figures, mirrored field by field by ``LatencyStats.msg``."""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields


@dataclass
class LatencyStats:
    """What one answer cost. Times are milliseconds; sizes are bytes.

    Fields a policy does not have (e.g. ``prefetch_hit_rate`` without prefetch) stay zero.
    """

    policy: str = ""
    queue_ms: float = 0.0
    vision_encode_ms: float = 0.0
    retrieval_ms: float = 0.0
    transfer_ms: float = 0.0
    copy_device_ms: float = 0.0
    prefill_ms: float = 0.0
    ttft_ms: float = 0.0
    decode_ms: float = 0.0
    total_ms: float = 0.0
    tokens_generated: int = 0
    frames_in_memory: int = 0
    tokens_in_memory: int = 0
    device_kv_bytes: int = 0
    host_kv_bytes: int = 0
    clusters_in_memory: int = 0
    tokens_retrieved: int = 0
    bytes_moved: int = 0
    copies: int = 0
    prefetch_hit_rate: float = 0.0
    tokens_evicted: int = 0
    disk_fetch_ms: float = 0.0
    disk_bytes_read: int = 0
    disk_kv_bytes: int = 0

    def as_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def field_names(cls) -> list[str]:
        return [f.name for f in fields(cls)]


@dataclass
class Answer:
    """A question's answer text with its stats. ``cancelled`` is true when generation stopped early."""

    text: str
    stats: LatencyStats
    cancelled: bool = False
