"""One interface over the vision-language model families, and the data that flows through it.

A stream is fed to the language model as a sequence of *chunks* (system preamble, one chunk per
frame, a question, decoded tokens, ...), each with its input embeddings and its rotary position
ids. The caller owns the KV cache (any ``transformers.cache_utils.Cache``) and the attention
function; an adapter turns frames and text into chunks and runs the model's own modules on them.

Rotary positions advance with a ``PositionCursor``. For 1-D RoPE a chunk of L tokens moves it by
L; for M-RoPE (Qwen-VL) a frame's vision tokens share one temporal position and spread over
height/width, and the text after them continues at the largest position used plus one, exactly
as the model's ``get_rope_index`` numbers a whole sequence.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch
from transformers.cache_utils import Cache

from mosaic_ros.runtime.kv.rope import PositionTable

TEXT = 0
VISION = 1
ROTARY_TABLE_BYTES = 64 << 20  # a 1-D RoPE model's cos/sin table on a CPU: 262,144 positions at head_dim 64


class FrameError(ValueError):
    """A frame that cannot be fed to the model (empty, wrong dtype, wrong shape)."""


class ModelLoadError(RuntimeError):
    """A model spec that cannot be loaded; the message says what to do about it."""


@dataclass(frozen=True)
class PositionCursor:
    """The next free rotary position of a stream (an integer on the model's position axis)."""

    next_position: int = 0


@dataclass
class Chunk:
    """A run of L tokens ready for the language model.

    inputs_embeds: (1, L, hidden) in the model dtype, on the model device.
    position_ids: (P, 1, L) long on the model device; P = ``adapter.position_dims`` (3 for
        M-RoPE, in the (temporal, height, width) layout the Qwen-VL forward takes; 1 for 1-D
        RoPE, which ``adapter.forward`` hands to the model as (1, L)).
    token_positions: (P, L) long on CPU, the same positions per token, for the KV store.
    modality: (L,) uint8 on CPU, 0 for text and 1 for vision tokens.
    token_ids: (L,) long on CPU; vision tokens carry the family's video placeholder id.
    cursor: the position cursor after this chunk.
    extra_model_kwargs: further language-model inputs (Qwen3-VL: deepstack features and the
        mask of vision tokens they are added to); empty for the other families.
    """

    inputs_embeds: torch.Tensor
    position_ids: torch.Tensor
    token_positions: torch.Tensor
    modality: torch.Tensor
    token_ids: torch.Tensor
    cursor: PositionCursor
    extra_model_kwargs: dict[str, Any] = field(default_factory=dict)

    @property
    def n_tokens(self) -> int:
        """Number of tokens L."""
        return int(self.inputs_embeds.shape[1])


@dataclass
class FrameBatch:
    """Preprocessed pixels of F frames, on CPU in float32.

    pixel_values: Qwen-VL: (sum of patches, 3 * temporal_patch_size * patch_size**2);
        LLaVA-OneVision: (F, 3, side, side).
    grid_thw: (C, 3) long, one row per frame chunk (``adapter.frames_per_chunk`` frames each;
        C = F unless frames are paired); Qwen-VL: patch grid (1, rows, cols); LLaVA-OneVision:
        (1, pooled rows, pooled cols).
    frame_sizes: original (height, width) of each of the F frames in pixels.
    """

    pixel_values: torch.Tensor
    grid_thw: torch.Tensor
    frame_sizes: list[tuple[int, int]]

    @property
    def num_frames(self) -> int:
        return len(self.frame_sizes)


@dataclass
class VisionFeatures:
    """Vision tower output of C frame chunks (one frame each unless frames are paired).

    embeds: per chunk, (n_i, hidden) LM input embeddings in the model dtype, on the model device.
    grid_thw: (C, 3) long, as in ``FrameBatch``.
    deepstack: Qwen3-VL only: per chunk, one (n_i, hidden) tensor per LM layer it is added to.
    """

    embeds: list[torch.Tensor]
    grid_thw: torch.Tensor
    deepstack: list[list[torch.Tensor]] | None = None

    @property
    def num_frames(self) -> int:
        return len(self.embeds)

    def frame(self, index: int) -> VisionFeatures:
        """The features of frame chunk ``index`` alone."""
        return VisionFeatures(
            embeds=[self.embeds[index]],
            grid_thw=self.grid_thw[index : index + 1],
            deepstack=None if self.deepstack is None else [self.deepstack[index]],
        )


@dataclass
class ChunkPart:
    """A piece of a chunk: tokens with their rotary offsets from the piece's start position.

    offsets: (P, n) long, added to the start position; span: how far the piece moves the cursor.
    embeds: (n, hidden) for vision pieces; text pieces are embedded from ``token_ids``.
    """

    token_ids: torch.Tensor
    offsets: torch.Tensor
    span: int
    modality: int = TEXT
    embeds: torch.Tensor | None = None


class VLMAdapter(ABC):
    """A vision-language model seen as: frames -> vision features -> chunks -> LM forward.

    Subclasses (one per family) say how frames become pixels and tokens and how rotary
    positions are laid out; the language model always runs through the model's own modules.

    ``frames_per_chunk``: frames one frame chunk holds (1; 2 for Qwen-VL with paired frames).
    A stream holds each frame back until the chunk is complete, then ingests the chunk at
    ``chunk_stamp`` of its frames' stamps.
    """

    family: ClassVar[str]
    frames_per_chunk: int = 1
    position_dims: ClassVar[int]
    model_type: ClassVar[str]
    system_prompt: ClassVar[str] = "You are a helpful assistant."

    def __init__(
        self,
        model: torch.nn.Module,
        tokenizer: Any,
        *,
        image_mean: tuple[float, ...],
        image_std: tuple[float, ...],
    ) -> None:
        model.eval()
        model.requires_grad_(False)
        self.model = model
        self.tokenizer = tokenizer
        self.image_mean = tuple(float(v) for v in image_mean)
        self.image_std = tuple(float(v) for v in image_std)
        first = next(model.parameters())
        self.device: torch.device = first.device
        self.dtype: torch.dtype = first.dtype
        text_config = model.config.get_text_config()
        self.num_layers: int = int(text_config.num_hidden_layers)
        self.num_heads: int = int(text_config.num_attention_heads)
        self.num_kv_heads: int = int(text_config.num_key_value_heads)
        self.head_dim: int = int(self.language_model.layers[0].self_attn.head_dim)
        self.hidden_size: int = int(text_config.hidden_size)
        self.eos_token_ids: tuple[int, ...] = self._find_eos_ids()
        self.rotary = ModelRotary(self)  # positions (P, N) -> cos, sin (N, head_dim)

    # ------------------------------------------------------------------ model parts

    @property
    def language_model(self) -> torch.nn.Module:
        """The decoder stack (embeddings, layers, final norm, rotary embedding)."""
        return self.model.model.language_model

    def _find_eos_ids(self) -> tuple[int, ...]:
        vocab = self.tokenizer.get_vocab()
        ids = {vocab[t] for t in ("<|im_end|>", "<|endoftext|>") if t in vocab}
        if self.tokenizer.eos_token_id is not None:
            ids.add(int(self.tokenizer.eos_token_id))
        generation = getattr(self.model, "generation_config", None)
        eos = getattr(generation, "eos_token_id", None)
        if isinstance(eos, int):
            ids.add(eos)
        elif eos is not None:
            ids.update(int(i) for i in eos)
        return tuple(sorted(ids))

    def set_attention(self, name: str) -> None:
        """Run the language model's attention with the registered implementation ``name``
        (``transformers.AttentionInterface``); the vision tower keeps its own (sdpa)."""
        self.model.set_attn_implementation({"text_config": name})

    # ------------------------------------------------------------------ frames

    @abstractmethod
    def tokens_per_frame(self, height: int, width: int) -> int:
        """Vision tokens of one frame chunk of frames of (height, width) pixels: per frame, this
        divided by ``frames_per_chunk`` (the chunk adds a few text tokens: the time marker and,
        for Qwen-VL, vision start/end)."""

    @abstractmethod
    def prepare_frames(self, frames: list[np.ndarray]) -> FrameBatch:
        """RGB uint8 frames (H, W, 3) -> preprocessed pixels, consecutive frames grouped into
        chunks of ``frames_per_chunk`` (a short last group is completed by repeating its last
        frame); raises ``FrameError`` on bad frames."""

    @abstractmethod
    def encode_frames(self, batch: FrameBatch) -> VisionFeatures:
        """Run the vision tower (and projector) on a batch of frames."""

    @abstractmethod
    def frame_chunk(self, features: VisionFeatures, stamp_s: float, cursor: PositionCursor) -> Chunk:
        """A time marker as text (the chunk's stream time ``stamp_s`` in seconds, see
        ``chunk_stamp``) followed by its vision tokens. ``features`` must hold exactly one chunk."""

    def chunk_stamp(self, stamps: list[float]) -> float:
        """Stream time (s) of a frame chunk from its frames' stamps (s): the frame's own for one
        frame; for a pair, the midpoint of the two, as Qwen3-VL's processor labels a temporal
        patch of a video. It marks the chunk's text and every token it stores."""
        if len(stamps) != self.frames_per_chunk:
            raise ValueError(
                f"a frame chunk holds {self.frames_per_chunk} frame(s), got {len(stamps)} stamps"
            )
        return (float(stamps[0]) + float(stamps[-1])) / 2

    def time_marker(self, stamp_s: float) -> str:
        """The text placed before a frame, e.g. ``<t=12.5s>``."""
        return f"<t={stamp_s:.1f}s>"

    # ------------------------------------------------------------------ text chunks

    def encode_text(self, text: str) -> list[int]:
        """Token ids of ``text`` without any added special tokens."""
        return list(self.tokenizer.encode(text, add_special_tokens=False))

    def system_chunk(self, cursor: PositionCursor) -> Chunk:
        """System prompt and the opening of the user turn: the stream's attention-sink tokens."""
        preamble = f"<|im_start|>system\n{self.system_prompt}<|im_end|>\n<|im_start|>user\n"
        return self._text_chunk(preamble, cursor)

    def question_chunk(self, question: str, cursor: PositionCursor) -> Chunk:
        """The question, the end of the user turn and the opening of the assistant turn."""
        return self._text_chunk(f"\n{question}<|im_end|>\n<|im_start|>assistant\n", cursor)

    def text_event_chunk(self, text: str, stamp_s: float, cursor: PositionCursor) -> Chunk:
        """A text event seen at ``stamp_s`` s (a transcript line, an operator's note) inside the
        user turn: the time marker, as before a frame, then the text and a newline."""
        return self._text_chunk(f"{self.time_marker(stamp_s)} {text}\n", cursor)

    def resume_chunk(self, answer_text: str, cursor: PositionCursor) -> Chunk:
        """An answer, the end of the assistant turn and a re-opened user turn for more frames."""
        return self._text_chunk(f"{answer_text}<|im_end|>\n<|im_start|>user\n", cursor)

    def token_chunk(self, token_id: int, cursor: PositionCursor) -> Chunk:
        """One decoded token."""
        return self.tokens_chunk([token_id], cursor)

    def tokens_chunk(self, token_ids: list[int], cursor: PositionCursor) -> Chunk:
        """Given token ids as text tokens (decoded tokens, or a continuation to score)."""
        return self._chunk([self._text_part([int(t) for t in token_ids])], cursor)

    def _text_chunk(self, text: str, cursor: PositionCursor) -> Chunk:
        return self._chunk([self._text_part(self.encode_text(text))], cursor)

    def _text_part(self, token_ids: list[int]) -> ChunkPart:
        n = len(token_ids)
        offsets = torch.arange(n, dtype=torch.long).expand(self.position_dims, n)
        return ChunkPart(token_ids=torch.tensor(token_ids, dtype=torch.long), offsets=offsets, span=n)

    def _chunk(self, parts: list[ChunkPart], cursor: PositionCursor) -> Chunk:
        start = cursor.next_position
        positions, embeds = [], []
        for part in parts:
            positions.append(part.offsets + start)
            start += part.span
            if part.embeds is None:
                ids = part.token_ids.to(self.device)
                embeds.append(self.model.get_input_embeddings()(ids).detach())
            else:
                embeds.append(part.embeds.to(self.device, self.dtype))
        token_positions = torch.cat(positions, dim=1)
        return Chunk(
            inputs_embeds=torch.cat(embeds, dim=0)[None],
            position_ids=token_positions[:, None, :].to(self.device),
            token_positions=token_positions,
            modality=torch.cat([torch.full(p.token_ids.shape, p.modality, dtype=torch.uint8) for p in parts]),
            token_ids=torch.cat([p.token_ids for p in parts]),
            cursor=PositionCursor(start),
        )

    def concat_chunks(self, chunks: list[Chunk]) -> Chunk:
        """Consecutive chunks as one (fed in one forward, it gives the same result as feeding them
        one by one); the cursor is the last chunk's."""
        return Chunk(
            inputs_embeds=torch.cat([c.inputs_embeds for c in chunks], dim=1),
            position_ids=torch.cat([c.position_ids for c in chunks], dim=2),
            token_positions=torch.cat([c.token_positions for c in chunks], dim=1),
            modality=torch.cat([c.modality for c in chunks]),
            token_ids=torch.cat([c.token_ids for c in chunks]),
            cursor=chunks[-1].cursor,
            extra_model_kwargs=self._concat_extra(chunks),
        )

    def _concat_extra(self, chunks: list[Chunk]) -> dict[str, Any]:
        return {}

    @staticmethod
    def _check_stamp(stamp_s: float) -> None:
        if not math.isfinite(stamp_s) or stamp_s < 0:
            raise ValueError(f"frame time stamp must be a finite number of seconds >= 0, got {stamp_s}")

    @staticmethod
    def _single_frame(features: VisionFeatures) -> None:
        if features.num_frames != 1:
            raise ValueError(
                f"a frame chunk takes the features of one frame chunk, got {features.num_frames}; "
                "use features.frame(i)"
            )

    # ------------------------------------------------------------------ language model

    def _model_position_ids(self, position_ids: torch.Tensor) -> torch.Tensor:
        """(P, 1, L) chunk positions -> the layout the language model's forward takes."""
        return position_ids

    def forward(self, chunk: Chunk, past_key_values: Cache, all_positions: bool = False) -> torch.Tensor:
        """Run the language model on ``chunk`` after what ``past_key_values`` holds; the cache is
        extended by the chunk's keys/values. Returns the last position's logits (1, vocab) fp32,
        or with ``all_positions`` every position's (L, vocab) (to score a continuation)."""
        with torch.no_grad():
            out = self.language_model(
                inputs_embeds=chunk.inputs_embeds,
                position_ids=self._model_position_ids(chunk.position_ids),
                past_key_values=past_key_values,
                use_cache=True,
                **chunk.extra_model_kwargs,
            )
            hidden = out.last_hidden_state[0] if all_positions else out.last_hidden_state[:, -1, :]
            logits = self.model.lm_head(hidden)
        return logits.float()

    # ------------------------------------------------------------------ persistence

    def save_pretrained(self, folder: str | Path) -> None:
        """Write model, tokenizer and image-processor config to ``folder`` in the Hugging Face
        layout, loadable with ``load_model(folder)``."""
        self.model.save_pretrained(folder)
        self.tokenizer.save_pretrained(folder)
        self._image_processor().save_pretrained(folder)

    @abstractmethod
    def _image_processor(self) -> Any:
        """The transformers image processor equivalent to this adapter's preprocessing."""


class ModelRotary:
    """A model's own rotary cos/sin as a ``RotaryFn``: positions (P, N) -> two (N, head_dim) float32
    tensors on the model device (M-RoPE sections applied), such that the model's post-RoPE key is
    ``apply_rotary(k_pre, cos, sin)``.

    With 1-D RoPE on a CPU whose angles do not depend on the sequence length (not a "dynamic" or
    "longrope" RoPE type), the model's values are kept in ``table`` (a ``PositionTable`` of at most
    ``ROTARY_TABLE_BYTES``) and looked up: the same values, and ``rotate_context`` rotates keys
    straight from it. Otherwise ``table`` is None and every call asks the model.
    """

    def __init__(self, adapter: VLMAdapter):
        self._adapter = adapter
        self.table = self._make_table()

    def __call__(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        dims = self._adapter.position_dims
        if positions.ndim != 2 or positions.shape[0] != dims:
            raise ValueError(f"positions must be ({dims}, N), got {tuple(positions.shape)}")
        if self.table is not None:
            found = self.table.lookup(positions[0].to("cpu", torch.int64))
            if found is not None:
                return found
        return self.from_model(positions)

    def from_model(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The model's rotary embedding evaluated for ``positions`` (P, N), no table."""
        ad = self._adapter
        probe = torch.zeros((), dtype=torch.float32, device=ad.device)
        position_ids = ad._model_position_ids(positions.to(ad.device, torch.long)[:, None, :])
        cos, sin = ad.language_model.rotary_emb(probe, position_ids)
        return cos[0].float(), sin[0].float()

    def _make_table(self) -> PositionTable | None:
        ad = self._adapter
        rope_type = str(getattr(ad.language_model.rotary_emb, "rope_type", "default"))
        # "dynamic" and "longrope" change their frequencies with the positions asked: no table
        varying = "dynamic" in rope_type or rope_type == "longrope"
        if ad.position_dims != 1 or ad.device.type != "cpu" or varying:
            return None
        half = ad.head_dim // 2

        def halves(pos: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            cos, sin = self.from_model(pos[None])
            return cos[:, :half].contiguous(), sin[:, :half].contiguous()

        cos, sin = self.from_model(torch.arange(64)[None])  # standard RoPE: halves repeat
        if not (torch.equal(cos[:, :half], cos[:, half:]) and torch.equal(sin[:, :half], sin[:, half:])):
            return None
        return PositionTable(halves, ad.head_dim, max_bytes=ROTARY_TABLE_BYTES)
