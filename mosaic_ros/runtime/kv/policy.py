"""The ``KVPolicy`` interface: what a policy decides, and the shapes it hands to attention.

A policy owns one stream's KV memory for all layers. The stream appends tokens chunk by
chunk (a frame, a time marker, a question's text); each layer's keys arrive *pre-RoPE*
(position-free), with the rotary positions kept per token so attention can re-apply the
original positions (or re-assigned ones) on the device. Between frames the policy may do
deferred maintenance. Per question, attention asks the policy, layer by layer, for the
context to attend to; the policy selects stored tokens within its device budget, moves
them to the device and reports what that cost.

Every policy shares the same storage (``HostKVStore``), the same budget semantics and the
same attention path, so comparing policies is a one-flag change.

Shapes: ``H_kv`` KV heads, ``H_q`` query heads, ``D`` head dim, ``T`` tokens, ``P`` rotary
position components (1 for 1-D RoPE, 3 for M-RoPE).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, replace
from typing import Any, ClassVar

import torch

from mosaic_ros.runtime.config import check, options, setting, strict


@dataclass(frozen=True)
class KVGeometry:
    """KV shape of a model: what one token costs per layer and in all."""

    num_layers: int
    num_kv_heads: int
    head_dim: int
    num_q_heads: int
    position_dims: int = 1
    dtype: torch.dtype = torch.float16

    def __post_init__(self) -> None:
        for name in ("num_layers", "num_kv_heads", "head_dim", "num_q_heads"):
            if getattr(self, name) <= 0:
                raise ValueError(f"KVGeometry.{name} must be positive, got {getattr(self, name)}")
        if self.num_q_heads % self.num_kv_heads:
            raise ValueError(
                f"num_q_heads ({self.num_q_heads}) must be a multiple of num_kv_heads ({self.num_kv_heads})"
            )
        if self.position_dims not in (1, 3):
            raise ValueError(f"position_dims must be 1 or 3, got {self.position_dims}")

    @property
    def group_size(self) -> int:
        """Query heads per KV head (GQA)."""
        return self.num_q_heads // self.num_kv_heads

    @property
    def token_row_bytes(self) -> int:
        """Bytes of K (or of V) for one token in one layer."""
        return self.num_kv_heads * self.head_dim * self.dtype.itemsize

    @property
    def bytes_per_token(self) -> int:
        """Bytes of K and V for one token over all layers."""
        return 2 * self.num_layers * self.token_row_bytes


COMPRESSIONS = ("vsb", "drop_oldest")
DEFAULT_SINK_TOKENS = 32


@strict
@dataclass
class PolicyConfig:
    """Settings shared by every policy (a level of the configuration tree, ``runtime.config``).

    ``budget_tokens`` is the device-side budget per layer and per question, in tokens,
    sinks and local window included: no policy hands attention more than this.
    ``sink_tokens`` None lets the owner choose (a session: its fixed preamble; a policy made
    directly: ``DEFAULT_SINK_TOKENS``). ``host_cap_bytes`` (0 = none) caps the stream's host KV;
    when reached, the configured ``compression`` keeps memory under it. ``options`` carries
    policy-specific settings, each policy documents and validates its own.
    """

    budget_tokens: int = setting(
        8192,
        "Tokens of KV a question may bring to the device, per layer (sinks and local window included).",
        unit="tokens",
        low=1,
        high=1 << 30,
        flags=("--budget",),
    )
    sink_tokens: int | None = setting(
        None,
        "Attention sinks: the stream's first tokens, kept and attended by every step. Unset: the "
        "stream's fixed preamble (the system prompt).",
        unit="tokens",
        low=0,
        high=1 << 24,
        flags=("--sinks",),
    )
    window_tokens: int = setting(
        1024,
        "Recent tokens every step attends to while frames are ingested.",
        unit="tokens",
        low=0,
        high=1 << 24,
        flags=("--window",),
    )
    host_cap_bytes: int = setting(
        0,
        "Cap on host KV memory per stream (bounded-memory policies); 0 = no cap.",
        unit="MiB",
        low=0.0,
        high=1e9,
        name="host_cap_mb",
        scale=2**20,
    )
    compression: str = setting(
        "vsb",
        "How memory stays under host_cap_mb: vsb (LiveVLM's vision sink bucketing: keeps the "
        "tokens the stream attends to, over the whole timeline) or drop_oldest.",
        choices=COMPRESSIONS,
    )
    prefetch: bool = setting(True, "Cross-layer prefetch of retrieved KV (policies that have it).")
    reselect_every: int = setting(
        0,
        "Decode passes between re-selections of a question's KV, each with the pass's own queries "
        "(the token that writes an answer attends elsewhere than the question); 0 = select once, "
        "at the question.",
        unit="passes",
        low=0,
        high=1 << 16,
    )
    options: dict[str, Any] = options(
        "The selected policy's own options (key: value), typed by their defaults; another policy's "
        "are refused."
    )
    disk_dir: str = setting(
        "",
        "Directory of the disk tier: under host_cap_mb, cold KV pages are spilled to files there "
        "(one private folder per stream) instead of being dropped, and read back when a question "
        "selects them. '' = no disk tier (on the node, with memory_dir set and disk_cap_mb > 0: "
        "memory_dir/.disk).",
    )
    disk_cap_bytes: int = setting(
        0,
        "Cap on the disk tier's KV per stream; memory is compressed only once it is full too. "
        "0 = no disk tier (needs host_cap_mb and disk_dir).",
        unit="MiB",
        low=0.0,
        high=1e12,
        name="disk_cap_mb",
        scale=2**20,
    )

    def __post_init__(self) -> None:
        check(self)
        check_disk_tier(self)
        sinks = self.sink_tokens or 0
        if sinks + self.window_tokens > self.budget_tokens:
            raise ValueError(
                f"sink_tokens + window_tokens ({sinks + self.window_tokens}) exceed "
                f"budget_tokens ({self.budget_tokens})"
            )


def check_disk_tier(config: PolicyConfig) -> None:
    """``ValueError`` unless the disk tier's settings agree: a disk cap >= 0, and > 0 only with a
    host cap and a ``disk_dir`` (whether the directory is usable is checked when the policy is
    made)."""
    if config.disk_cap_bytes < 0:
        raise ValueError(f"disk_cap_bytes must be >= 0, got {config.disk_cap_bytes}")
    if config.disk_cap_bytes and not config.host_cap_bytes:
        raise ValueError(
            "disk_cap_bytes > 0 needs host_cap_bytes > 0: the disk holds what the host cap does not"
        )
    if config.disk_cap_bytes and not config.disk_dir:
        raise ValueError("disk_cap_bytes > 0 needs a disk_dir (the directory of the disk tier's files)")


@dataclass
class TokenMeta:
    """Per-token facts of one appended chunk, shared by all layers.

    positions: (P, T) int64 rotary positions as the model applied them.
    stamps: (T,) float64 stream time in seconds (text tokens carry the time they were added).
    modality: (T,) uint8, 0 = text, 1 = vision.
    frame: (T,) int64 frame index, -1 for text.
    """

    positions: torch.Tensor
    stamps: torch.Tensor
    modality: torch.Tensor
    frame: torch.Tensor

    def __post_init__(self) -> None:
        n = self.positions.shape[-1]
        if self.positions.dim() != 2:
            raise ValueError(f"positions must be (P, T), got {tuple(self.positions.shape)}")
        for name in ("stamps", "modality", "frame"):
            t = getattr(self, name)
            if t.shape != (n,):
                raise ValueError(f"{name} must be ({n},), got {tuple(t.shape)}")

    @property
    def num_tokens(self) -> int:
        return int(self.positions.shape[-1])


@dataclass
class ExportedTokens:
    """Stored tokens read out of a policy, enough to replay them into a fresh one.

    ids: (n,) int64 the policy's token ids, ascending; meta: their ``TokenMeta``; kv: per layer
    (n, 2, H_kv, D) pre-RoPE K then V in the KV dtype, on the CPU (copies, not views).
    """

    ids: torch.Tensor
    meta: TokenMeta
    kv: list[torch.Tensor]


@dataclass
class KVContext:
    """Stored tokens of one layer handed to attention, on the compute device.

    keys: (H_kv, T, D) pre-RoPE; values: (H_kv, T, D); positions: (P, H_kv, T) int64
    rotary positions to apply to ``keys``; token_ids: (H_kv, T) int64 logical token ids
    (what fidelity is measured on). Selections shared by all heads are expanded views.
    """

    keys: torch.Tensor
    values: torch.Tensor
    positions: torch.Tensor
    token_ids: torch.Tensor

    @property
    def num_tokens(self) -> int:
        return int(self.keys.shape[1])


@dataclass
class RetrievalStats:
    """What one question's retrieval cost, summed over layers. Times in ms, sizes in bytes.

    ``transfer_ms`` is host wall time bringing the selection to the device (planning and copies;
    on CUDA, issuing asynchronous copies); ``copy_ms`` is the part of it spent inside the copy
    calls themselves (the rest is residency planning and bookkeeping); ``copy_device_ms`` is
    the copies' own time on the device's copy stream (CUDA events; on a CPU, ``copy_ms``).
    ``disk_fetch_ms``: time reading KV of spilled pages from the disk tier's files (for
    fetches, and for selections that score every key), counted in neither ``select_ms`` nor
    ``transfer_ms``; ``disk_bytes_read``: what those reads took from the files.
    """

    select_ms: float = 0.0
    transfer_ms: float = 0.0
    copy_ms: float = 0.0
    copy_device_ms: float = 0.0
    copies: int = 0
    bytes_moved: int = 0
    tokens_retrieved: int = 0
    prefetch_hits: int = 0
    prefetch_lookups: int = 0
    disk_fetch_ms: float = 0.0
    disk_bytes_read: int = 0

    @property
    def prefetch_hit_rate(self) -> float:
        return self.prefetch_hits / self.prefetch_lookups if self.prefetch_lookups else 0.0


@dataclass
class MemoryStats:
    """Memory held by a policy now. ``units`` are clusters, pages or blocks (per layer, mean).
    ``tokens`` counts every token held (host memory, device, disk); ``disk_kv_bytes``: KV in the
    disk tier's files; ``staging_bytes``: pinned host memory held to stage copies to a GPU."""

    tokens: int = 0
    host_kv_bytes: int = 0
    disk_kv_bytes: int = 0
    device_kv_bytes: int = 0
    device_kv_bytes_peak: int = 0
    units: int = 0
    tokens_evicted: int = 0
    staging_bytes: int = 0


class KVPolicy(ABC):
    """One stream's KV memory and the rule that decides what reaches the device.

    Call order per chunk: ``add_tokens`` once, then for each layer ``ingest_context`` (what
    the chunk attends to while ingesting) and ``append`` (the chunk's KV), then
    ``maintain`` between chunks. Per question: ``begin_question``, then for each layer
    ``retrieve``, then ``end_question``. Calls are not thread-safe: the owner serialises them.
    """

    name: ClassVar[str]

    @classmethod
    def known_options(cls) -> dict[str, Any]:
        """Every ``PolicyConfig.options`` key this policy takes, with its default."""
        return {}

    def __init__(self, geometry: KVGeometry, config: PolicyConfig, device: torch.device | str = "cpu"):
        self.geometry = geometry
        if config.sink_tokens is None:
            config = replace(config, sink_tokens=DEFAULT_SINK_TOKENS)
        self.config = config
        self.device = torch.device(device)

    @abstractmethod
    def add_tokens(self, meta: TokenMeta) -> torch.Tensor:
        """Register a chunk's token facts; returns its logical token ids (T,) int64."""

    @abstractmethod
    def ingest_context(self, layer: int) -> KVContext | None:
        """Stored tokens a new chunk attends to during ingest (None: nothing stored yet)."""

    @abstractmethod
    def append(self, layer: int, keys: torch.Tensor, values: torch.Tensor, token_ids: torch.Tensor) -> None:
        """Store one layer's KV of a chunk: keys (T, H_kv, D) pre-RoPE, values (T, H_kv, D)."""

    def maintain(self, budget_ms: float) -> float:
        """Deferred work between chunks within ``budget_ms``; returns ms spent (default: none)."""
        return 0.0

    @abstractmethod
    def begin_question(self, window: tuple[float, float] | None = None) -> None:
        """Start a question; ``window`` = (t_start, t_end) seconds limits what may be retrieved."""

    @abstractmethod
    def retrieve(self, layer: int, query: torch.Tensor) -> KVContext:
        """Select and fetch this layer's context for the question's queries (H_q, L_q, D) pre-RoPE."""

    @abstractmethod
    def end_question(self) -> RetrievalStats:
        """Finish the question; returns its retrieval cost."""

    @abstractmethod
    def memory(self) -> MemoryStats:
        """Memory held now."""

    @abstractmethod
    def reset(self) -> None:
        """Forget the whole stream."""

    def close(self) -> None:  # noqa: B027 (optional: most policies hold nothing outside their objects)
        """Release what the policy holds outside its objects (the disk tier's files, threads);
        the policy is unusable after. Default: nothing to release."""

    def live_token_ids(self) -> torch.Tensor:
        """Ids (n,) int64, ascending, of the tokens held, the same set in every layer. Raises
        ``ValueError`` when layers hold different tokens (per-layer compression under a host
        cap): such a memory cannot be exported. Policies without a token store raise
        ``NotImplementedError``."""
        raise NotImplementedError(f"policy {self.name!r} cannot export its tokens")

    def export_tokens(self, token_ids: torch.Tensor) -> ExportedTokens:
        """Copy out held tokens ``token_ids`` (n,) ascending: their meta and every layer's KV.
        Replaying them (``add_tokens`` of the meta, ``append`` per layer, ``maintain``) into a
        fresh policy of the same kind rebuilds the memory."""
        raise NotImplementedError(f"policy {self.name!r} cannot export its tokens")


POLICIES: dict[str, type[KVPolicy]] = {}


def register_policy(cls: type[KVPolicy]) -> type[KVPolicy]:
    """Class decorator: make a policy available to ``make_policy`` under ``cls.name``."""
    POLICIES[cls.name] = cls
    return cls


def known_policies() -> list[str]:
    """Names of the registered policies, the built-in ones included, sorted."""
    from mosaic_ros.runtime.kv import policies  # noqa: F401  (registers the built-in policies)

    return sorted(POLICIES)


def policy_options(name: str) -> dict[str, Any]:
    """The options (``PolicyConfig.options`` keys with their defaults) of the policy ``name``;
    ``ValueError`` listing the known policies for an unknown name."""
    if name not in known_policies():
        raise ValueError(f"unknown KV policy {name!r}; known: {', '.join(known_policies())}")
    return POLICIES[name].known_options()


def make_policy(
    name: str, geometry: KVGeometry, config: PolicyConfig | None = None, device: torch.device | str = "cpu"
) -> KVPolicy:
    """Build a registered policy by name; unknown names raise ``ValueError`` listing the known ones."""
    if name not in known_policies():
        raise ValueError(f"unknown KV policy {name!r}; known: {', '.join(known_policies())}")
    return POLICIES[name](geometry, config or PolicyConfig(), device)
