"""The needle workload: KV policies judged by a real LM's answers, on questions with checkable answers.

A stream is a list of text events ``(t seconds, sentence)``, one per "frame": mostly filler
observations ("A visitor waits beside the stairs."), a few *needles* with unguessable answers
("The number on the red locker is 4817.") at spread depths. Each event enters the model as a
frame chunk of the adapter: the time marker ``<t=12.0s>`` as text, then the sentence's own
token embeddings in place of the visual tokens. That is an ORACLE vision tower (it "sees"
exactly the sentence): the K/V of every frame token comes from the real LM reading real words,
so the attention the policies must follow is the real model's. The build's own vision tower is
random and plays no part.

Per stream and policy (all at one budget), the stream is ingested chunk by chunk through a
``KVBridge`` exactly as ``StreamSession`` does, then every question is asked on the untouched
stream (no dialogue memory) and, within the one retrieval of that question (the context each
layer fetched at the question's prefill):

- greedy answer (``max_new_tokens``), scored by substring match of the expected answer
  (case-insensitive); its wall time (prefill + decode, ms) is the policy's time per question,
  reported also as its parts: the prefill (every layer's retrieval and the question's forward
  pass, ms) and the milliseconds per decode pass (one answer token through the model), since
  policies' answers differ in length and a longer answer costs more passes;
- forced choice: the log-likelihood (sum over its tokens) of each candidate answer as the
  assistant's reply, after the question's answer prefix when it has one ("The number on the
  red locker is"); right when the expected answer scores highest;
- teacher-forced over dense's greedy answer (its tokens and its stop token): per position,
  whether the policy's top-1 next token is dense's, and KL(dense || policy) of the next-token
  distributions.

``NeedleWorkload`` also records dense's stream (pre-RoPE K/V per chunk) and each question's
prefill queries and local keys/values, so ``runner.run_policies`` can measure recall and
attention-output error against dense on the real attention, and select / transfer / attention
time, exactly as for the other workloads (queries are dense's for every policy there).

``--needles FILE`` reads a stream from JSON lines: ``{"t": seconds, "text": ...}`` events and
``{"question": ..., "answer": ..., "choices": [...], "prefix": ...}`` questions (choices and
prefix optional; choices, when given, must contain the answer). ``--needles FOLDER`` reads every
``*.jsonl`` file in it as one stream each, in name order (``needle_files``).
"""

from __future__ import annotations

import itertools
import json
import math
import random
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from mosaic_ros.runtime.bench.workloads import Chunk, Question
from mosaic_ros.runtime.kv.bridge import ATTENTION_NAME, KVBridge
from mosaic_ros.runtime.kv.policy import KVGeometry, PolicyConfig, TokenMeta, make_policy
from mosaic_ros.runtime.kv.rope import unapply_rotary
from mosaic_ros.runtime.models.base import PositionCursor, VisionFeatures, VLMAdapter

_SUBJECTS = (
    "A visitor", "A robot", "A cleaner", "A delivery cart", "A child", "A dog", "Two workers",
    "A courier", "A nurse", "A security guard", "An old man", "A cyclist",
)  # fmt: skip
_ACTIONS = (
    "walks past", "stops near", "looks at", "waits beside", "moves away from", "points at",
    "turns towards", "sweeps the floor near", "carries a bag past", "stands next to",
)  # fmt: skip
_PLACES = (
    "the window", "the main door", "the kitchen counter", "the stairs", "the elevator",
    "the reception desk", "the shelves", "the parking gate", "the vending machine", "the corridor",
)  # fmt: skip
_COLORS = ("red", "blue", "green", "yellow", "white", "black", "orange", "purple", "grey", "pink")
_ITEMS = ("locker", "box", "door", "crate", "folder", "badge", "truck", "sign", "bottle", "drawer")
_WORDS = (
    "marigold", "tangerine", "walrus", "lantern", "cobalt", "saffron", "juniper", "pelican",
    "quartz", "falcon", "velvet", "harbor", "meadow", "glacier", "cactus", "violin", "pepper",
    "orchid", "canyon", "ember", "parrot", "thistle", "lagoon", "copper", "badger", "nutmeg",
    "compass", "magnet", "pumpkin", "anchor", "biscuit", "dolphin",
)  # fmt: skip


@dataclass(frozen=True)
class NeedleEvent:
    """One frame's observation: ``t`` seconds into the stream, and the sentence seen."""

    t: float
    text: str


@dataclass(frozen=True)
class NeedleQuestion:
    """A question, its expected answer, the candidates of the forced choice (may be empty), the
    start of the reply the candidates are scored after (may be empty) and, when known, the
    depth of the event holding the answer (0 = first event, 1 = last)."""

    question: str
    answer: str
    choices: tuple[str, ...] = ()
    prefix: str = ""
    depth: float | None = None


@dataclass
class NeedleSet:
    """One stream's events (time-ordered) and the questions asked after all of them."""

    name: str
    events: list[NeedleEvent]
    questions: list[NeedleQuestion]


def generate_needles(seed: int, frames: int, needles: int, frame_seconds: float = 2.0) -> NeedleSet:
    """A seeded stream of ``frames`` events, ``needles`` of them facts with unguessable answers
    (a 4-digit number or a word from a list, on a coloured item) at evenly spread depths; one
    question per needle, with 4 candidates: the answer, the other needles' answers of its kind
    (present in the stream, so the binding matters) and random ones of that kind."""
    if frames <= 0 or not 0 < needles <= frames:
        raise ValueError(f"need 0 < needles <= frames, got needles={needles}, frames={frames}")
    rng = random.Random(seed)
    texts = [f"{rng.choice(_SUBJECTS)} {rng.choice(_ACTIONS)} {rng.choice(_PLACES)}." for _ in range(frames)]
    slots = [min(frames - 1, int((i + 0.5) * frames / needles)) for i in range(needles)]
    objects = rng.sample([(c, i) for c in _COLORS for i in _ITEMS], needles)
    kinds = ["number" if k % 2 == 0 else "word" for k in range(needles)]
    rng.shuffle(kinds)
    numbers = rng.sample(range(1000, 10000), 4 * needles)
    words = rng.sample(_WORDS, min(len(_WORDS), 4 * needles))
    answers = [str(numbers.pop()) if kind == "number" else words.pop() for kind in kinds]
    questions = []
    for slot, (color, item), kind, answer in zip(slots, objects, kinds, answers, strict=True):
        if kind == "number":
            prefix = f"The number on the {color} {item} is"
            question = f"What is the number on the {color} {item}?"
        else:
            prefix = f"The word written on the {color} {item} is"
            question = f"What word is written on the {color} {item}?"
        texts[slot] = f"{prefix} {answer}."
        same_kind = [a for a, k in zip(answers, kinds, strict=True) if k == kind and a != answer]
        pool = [str(n) for n in numbers] if kind == "number" else list(words)
        distractors = (same_kind + pool)[:3]
        choices = [answer, *distractors]
        rng.shuffle(choices)
        depth = slot / max(frames - 1, 1)
        questions.append(NeedleQuestion(question, answer, tuple(choices), prefix, depth))
    events = [NeedleEvent(i * frame_seconds, text) for i, text in enumerate(texts)]
    return NeedleSet(f"generated seed {seed}", events, questions)


def needle_files(paths: list[str | Path]) -> list[Path]:
    """The stream files ``paths`` name: a file as given, a folder as its ``*.jsonl`` files in name
    order. Raises ``ValueError`` for a path that does not exist or a folder with no such file."""
    files: list[Path] = []
    for path in map(Path, paths):
        if path.is_dir():
            found = sorted(path.glob("*.jsonl"))
            if not found:
                raise ValueError(f"{path}: a folder with no *.jsonl needle stream in it")
            files.extend(found)
        elif path.is_file():
            files.append(path)
        else:
            raise ValueError(f"{path}: no such needle file or folder")
    return files


def read_needles(path: str | Path) -> NeedleSet:
    """A stream from a JSON-lines file (see the module docstring); raises ``ValueError`` naming
    the line of a malformed record."""
    events: list[NeedleEvent] = []
    questions: list[NeedleQuestion] = []
    for number, line in enumerate(Path(path).read_text().splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
            if "question" in record:
                answer = str(record["answer"])
                choices = tuple(str(c) for c in record.get("choices", ()))
                if choices and answer not in choices:
                    raise ValueError("its choices do not contain its answer")
                prefix = str(record.get("prefix", ""))
                questions.append(NeedleQuestion(str(record["question"]), answer, choices, prefix))
            else:
                t = float(record["t"])
                if not math.isfinite(t) or t < 0 or (events and t < events[-1].t):
                    raise ValueError(f"event time {t} must be finite, >= 0 and not go backwards")
                events.append(NeedleEvent(t, str(record["text"])))
        except (ValueError, KeyError, TypeError, AttributeError) as error:
            raise ValueError(f"{path}:{number}: not a needle event or question ({error})") from error
    if not events or not questions:
        raise ValueError(f"{path}: needs at least one event and one question")
    last = max(len(events) - 1, 1)
    located = []
    for q in questions:
        hits = [i for i, e in enumerate(events) if q.answer.lower() in e.text.lower()]
        depth = hits[0] / last if hits else None
        located.append(NeedleQuestion(q.question, q.answer, q.choices, q.prefix, depth))
    return NeedleSet(str(path), events, located)


class PolicyStream:
    """One needle stream in the real model's memory under one KV policy.

    Ingests like ``StreamSession`` (preamble, then one frame chunk per event: time marker +
    the sentence's token embeddings as the frame's tokens, then up to ``maintain_ms`` ms of
    the policy's deferred maintenance) through a ``KVBridge``; questions
    are asked on the stream as it is (nothing is remembered). The adapter must use 1-D RoPE.
    """

    def __init__(
        self,
        adapter: VLMAdapter,
        policy: str,
        config: PolicyConfig,
        kv_dtype: torch.dtype,
        maintain_ms: float = 5.0,
    ):
        if adapter.position_dims != 1:
            raise ValueError(f"the needle workload needs a 1-D RoPE model (llava-ov), not {adapter.family}")
        self.adapter = adapter
        self.maintain_ms = maintain_ms
        adapter.set_attention(ATTENTION_NAME)
        geometry = KVGeometry(
            num_layers=adapter.num_layers,
            num_kv_heads=adapter.num_kv_heads,
            head_dim=adapter.head_dim,
            num_q_heads=adapter.num_heads,
            position_dims=1,
            dtype=kv_dtype,
        )
        self.policy = make_policy(policy, geometry, config, adapter.device)
        self.bridge = KVBridge(self.policy, adapter.rotary, adapter.num_layers)
        self.cursor = PositionCursor()
        self.frames = 0
        self.chunk_bounds = [0]  # stored tokens after each chunk
        self._ingest(adapter.system_chunk(self.cursor), 0.0, vision=False)

    def ingest_event(self, event: NeedleEvent) -> None:
        """The event as a frame: its sentence's embeddings stand in for the visual tokens."""
        ad = self.adapter
        ids = torch.tensor(ad.encode_text(" " + event.text), dtype=torch.long, device=ad.device)
        embeds = ad.model.get_input_embeddings()(ids).detach()
        grid = torch.tensor([[1, 1, ids.numel()]], dtype=torch.long)
        chunk = ad.frame_chunk(VisionFeatures(embeds=[embeds], grid_thw=grid), event.t, self.cursor)
        self._ingest(chunk, event.t, vision=True)
        self.policy.maintain(self.maintain_ms)

    def _ingest(self, chunk, stamp: float, vision: bool) -> None:
        n = chunk.n_tokens
        modality = chunk.modality.to(torch.uint8)
        frame = torch.full((n,), -1, dtype=torch.int64)
        frame[modality.bool()] = self.frames
        meta = TokenMeta(
            positions=chunk.token_positions.cpu().to(torch.int64),
            stamps=torch.full((n,), stamp, dtype=torch.float64),
            modality=modality,
            frame=frame,
        )
        ids = self.policy.add_tokens(meta)
        with torch.no_grad(), self.bridge.ingest_step(chunk.token_positions, ids) as cache:
            self.adapter.forward(chunk, cache)
        self.cursor = chunk.cursor
        self.frames += int(vision)
        self.chunk_bounds.append(self.bridge.stored_tokens)

    def ask(
        self,
        question: str,
        max_new_tokens: int,
        choices: tuple[str, ...] = (),
        targets: list[int] | None = None,
        capture: bool = False,
        prefix: str = "",
    ) -> dict:
        """Greedy answer, choice log-likelihoods (after ``prefix``) and teacher-forced next-token
        log-probabilities (len(targets), vocab) along ``targets`` (default: the greedy answer and
        its stop token), all on one retrieval. With ``capture``, also the question's pre-RoPE queries
        (H_q, L_q, D) and local keys/values (H_kv, L_q, D) per layer."""
        ad = self.adapter
        eos = set(ad.eos_token_ids)
        out: dict = {}
        with torch.no_grad():
            qchunk = ad.question_chunk(question, self.cursor)
            q_len = qchunk.n_tokens
            t0 = time.perf_counter()
            self.bridge.begin_question(None, capture=capture)
            try:
                with self.bridge.question_step(qchunk.token_positions) as cache:
                    first = ad.forward(qchunk, cache)
                    prefill_end = time.perf_counter()
                    if capture:
                        out["queries"] = [q.cpu() for q in self.bridge.captured_queries]
                        cos, sin = ad.rotary(qchunk.token_positions)
                        out["local_keys"] = [
                            unapply_rotary(lay.keys[0].float(), cos, sin).cpu() for lay in cache.layers
                        ]
                        out["local_values"] = [lay.values[0].float().cpu() for lay in cache.layers]
                decode_start = time.perf_counter()
                tokens, stopped, passes = self._greedy(first, qchunk.cursor, max_new_tokens, eos)
                decode_ms = (time.perf_counter() - decode_start) * 1e3
                out["prefill_ms"] = (prefill_end - t0) * 1e3
                out["answer_ms"] = out["prefill_ms"] + decode_ms
                out["decode_passes"] = passes
                out["decode_ms_per_pass"] = decode_ms / passes if passes else None
                out["tokens"], out["stopped"] = tokens, stopped
                out["text"] = ad.tokenizer.decode(tokens, skip_special_tokens=True).strip()
                if targets is None:
                    targets = tokens + ([stopped] if stopped is not None else [])
                out["targets"] = targets
                if targets:
                    self.bridge.truncate_question(q_len)
                    out["target_logprobs"] = self._continuation(first, targets, qchunk.cursor)
                out["choice_logprobs"] = []
                head = ad.encode_text(prefix) if prefix else []
                for choice in choices:
                    self.bridge.truncate_question(q_len)
                    ids = ad.encode_text(f"{prefix} {choice}" if prefix else choice)
                    if ids[: len(head)] != head:
                        raise ValueError(
                            f"{prefix!r} + {choice!r} does not tokenize as the prefix, then the choice"
                        )
                    logprobs = self._continuation(first, ids, qchunk.cursor)
                    picked = logprobs[torch.arange(len(head), len(ids)), ids[len(head) :]]
                    out["choice_logprobs"].append(float(picked.sum()))
            finally:
                out["retrieval"] = self.bridge.end_question()
        return out

    def _greedy(self, logits: torch.Tensor, cursor: PositionCursor, limit: int, eos: set[int]):
        """Greedy tokens after the prefill's ``logits``: (tokens, stop token or None, decode passes)."""
        tokens: list[int] = []
        for i in range(limit):
            token = int(torch.argmax(logits[0]))
            if token in eos:
                return tokens, token, i
            tokens.append(token)
            if i + 1 == limit:
                break
            step = self.adapter.token_chunk(token, cursor)
            with self.bridge.question_step(step.token_positions) as cache:
                logits = self.adapter.forward(step, cache)
            cursor = step.cursor
        return tokens, None, max(limit - 1, 0)

    def _continuation(self, first: torch.Tensor, ids: list[int], cursor: PositionCursor) -> torch.Tensor:
        """Log-probabilities (len(ids), vocab) of each next token along ``ids`` after the prefix.

        Teacher-forced in one pass, or one pass per token when the bridge re-selects during
        decoding (each token then attends to what greedy decoding would have fetched for it)."""
        rows = [first[0]]
        if len(ids) > 1:
            step = len(ids) - 1 if not self.bridge.reselect_every else 1
            for a in range(0, len(ids) - 1, step):
                chunk = self.adapter.tokens_chunk(ids[a : a + step], cursor)
                with self.bridge.question_step(chunk.token_positions) as cache:
                    rows.extend(self.adapter.forward(chunk, cache, all_positions=True))
                cursor = chunk.cursor
        return torch.log_softmax(torch.stack(rows).float(), dim=-1)


class NeedleWorkload:
    """Dense's recording of one needle stream, as a ``runner`` workload (``Workload`` protocol)."""

    def __init__(self, stream: PolicyStream, questions: list[dict], label: str):
        self.geometry = stream.policy.geometry
        self.rotary = stream.adapter.rotary
        self.label = label
        store = stream.policy.store
        bounds = stream.chunk_bounds
        self.num_chunks = len(bounds) - 1
        self._chunks = []
        for a, b in itertools.pairwise(bounds):
            ids = torch.arange(a, b)
            meta = TokenMeta(
                positions=store.positions[:, a:b].clone(),
                stamps=store.stamps[a:b].clone(),
                modality=store.modality[a:b].clone(),
                frame=store.frame[a:b].clone(),
            )
            keys, values = [], []
            for layer in range(self.geometry.num_layers):
                kv = store.read(layer, store.rows_of(layer, ids)).cpu()
                keys.append(kv[:, 0].contiguous())
                values.append(kv[:, 1].contiguous())
            self._chunks.append(Chunk(meta, keys, values))
        start = bounds[-1]
        self._questions = []
        for q in questions:
            lq = q["queries"][0].shape[1]
            self._questions.append(
                Question(
                    queries=q["queries"],
                    local_keys=q["local_keys"],
                    local_values=q["local_values"],
                    positions=torch.arange(start, start + lq)[None],
                    label=q["label"],
                )
            )

    def chunk(self, index: int) -> Chunk:
        """Chunk 0 is the preamble; chunk i >= 1 is event i - 1."""
        return self._chunks[index]

    def chunk_tokens(self, index: int) -> int:
        return self._chunks[index].meta.num_tokens

    def questions(self) -> list[Question]:
        return self._questions

    def describe(self) -> dict:
        return {
            "kind": "needles",
            "stream": self.label,
            "tokens": sum(c.meta.num_tokens for c in self._chunks),
            "questions": len(self._questions),
        }


@dataclass
class NeedleConfig:
    """The policies (dense is always run first, as the reference) and their shared settings.
    The attention sinks are the stream's preamble, as in ``StreamSession``."""

    policies: list[str]
    budget_tokens: int = 256
    window_tokens: int = 64
    options: dict[str, dict] = field(default_factory=dict)
    max_new_tokens: int = 16
    kv_dtype: torch.dtype = torch.float32
    maintain_ms: float = 5.0  # deferred maintenance after each event, ms (as the session's)
    reselect_every: int = 0  # decode passes between re-selections of the context (0: once per question)


def wilson_interval(successes: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """95% Wilson score interval of a proportion (0..1)."""
    if n == 0:
        return (0.0, 1.0)
    p = successes / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return (max(0.0, centre - half), min(1.0, centre + half))


def _policy_config(name: str, cfg: NeedleConfig, sinks: int) -> PolicyConfig:
    return PolicyConfig(
        budget_tokens=cfg.budget_tokens,
        sink_tokens=sinks,
        window_tokens=cfg.window_tokens,
        reselect_every=cfg.reselect_every,
        options=dict(cfg.options.get(name, {})),
    )


def _stream(adapter: VLMAdapter, name: str, cfg: NeedleConfig, needle_set: NeedleSet) -> PolicyStream:
    sinks = adapter.system_chunk(PositionCursor()).n_tokens
    stream = PolicyStream(adapter, name, _policy_config(name, cfg, sinks), cfg.kv_dtype, cfg.maintain_ms)
    for event in needle_set.events:
        stream.ingest_event(event)
    return stream


def answer_needles(
    adapter: VLMAdapter,
    needle_set: NeedleSet,
    cfg: NeedleConfig,
    on_question=None,
    dense_cache=None,
    turn: int = 0,
):
    """Every policy over one stream. Returns (per-question records, dense's ``NeedleWorkload``).

    Dense runs first (it is every other policy's reference); the others follow in the order of
    ``cfg.policies`` rotated by ``turn``. ``run_needles`` passes the stream's index, so over the
    streams each policy runs in every place equally often, and a machine that slows down within
    a stream's runs slows every policy alike instead of the one that always comes last.

    A record: question facts, and per policy its greedy text, substring hit, forced-choice hit,
    dense agreement, per-position top-1 agreements and KLs over dense's answer, answer ms.
    ``dense_cache``: a dict kept by the caller across runs that differ only in budget or window
    (a budget sweep): dense keeps every token whatever the budget, so its runs of a stream are
    made once and reused."""
    others = [p for p in cfg.policies if p != "dense"]
    if others:
        k = turn % len(others)
        others = others[k:] + others[:k]
    order = ["dense", *others]
    records = [
        {
            "question": q.question,
            "answer": q.answer,
            "depth": q.depth,
            "stream": needle_set.name,
            "policies": {},
        }
        for q in needle_set.questions
    ]
    dense_runs: list[dict] = []
    workload = None
    key = (needle_set.name, cfg.max_new_tokens)
    if dense_cache is not None and key in dense_cache:
        dense_runs, workload, scores, contexts = dense_cache[key]
        for record, score, context in zip(records, scores, contexts, strict=True):
            record["context_tokens"], record["policies"]["dense"] = context, score
        order = order[1:]
    for name in order:
        stream = _stream(adapter, name, cfg, needle_set)
        captured = []
        for qi, q in enumerate(needle_set.questions):
            is_dense = name == "dense"
            targets = None if is_dense else dense_runs[qi]["targets"]
            run = stream.ask(q.question, cfg.max_new_tokens, q.choices, targets, is_dense, q.prefix)
            if is_dense:
                records[qi]["context_tokens"] = stream.bridge.stored_tokens
                dense_runs.append(run)
                captured.append({**run, "label": q.question})
            records[qi]["policies"][name] = _score(q, run, dense_runs[qi])
            if on_question is not None:
                on_question()
        if name == "dense":
            workload = NeedleWorkload(stream, captured, needle_set.name)
            if dense_cache is not None:
                scores = [r["policies"]["dense"] for r in records]
                dense_cache[key] = (dense_runs, workload, scores, [r["context_tokens"] for r in records])
        del stream
    return records, workload


def _score(q: NeedleQuestion, run: dict, dense: dict) -> dict:
    """One policy's results on one question, against dense's run of the same question."""
    result = {
        "text": run["text"],
        "correct": q.answer.lower() in run["text"].lower(),
        "same_as_dense": run["text"] == dense["text"],
        "answer_ms": run["answer_ms"],
        "prefill_ms": run["prefill_ms"],
        "decode_passes": run["decode_passes"],
        "decode_ms_per_pass": run["decode_ms_per_pass"],
    }
    if q.choices:
        best = max(range(len(q.choices)), key=lambda i: run["choice_logprobs"][i])
        result["choice_correct"] = q.choices[best] == q.answer
    ref_lp, own_lp = dense.get("target_logprobs"), run.get("target_logprobs")
    if ref_lp is not None:
        top1 = (own_lp.argmax(-1) == ref_lp.argmax(-1)).float()
        kl = (ref_lp.exp() * (ref_lp - own_lp)).sum(-1).clamp_min(0.0)
        result["top1"] = top1.tolist()
        result["kl"] = kl.tolist()
    return result


def summarize(records: list[dict], policies: list[str]) -> dict[str, dict]:
    """Per policy: accuracy (substring) and forced-choice accuracy with 95% Wilson intervals,
    greedy agreement with dense, next-token top-1 agreement and mean KL over dense's answer
    positions, median answer ms and prefill ms, median ms per decode pass, mean decode passes."""
    out = {}
    for name in policies:
        rs = [r["policies"][name] for r in records]
        n = len(rs)
        hits = sum(r["correct"] for r in rs)
        chosen = [r["choice_correct"] for r in rs if "choice_correct" in r]
        top1 = [v for r in rs for v in r.get("top1", [])]
        kl = [v for r in rs for v in r.get("kl", [])]
        per_pass = [r["decode_ms_per_pass"] for r in rs if r["decode_ms_per_pass"] is not None]
        out[name] = {
            "questions": n,
            "accuracy": hits / n if n else 0.0,
            "accuracy_ci95": wilson_interval(hits, n),
            "choice_questions": len(chosen),
            "choice_accuracy": sum(chosen) / len(chosen) if chosen else None,  # no question had choices
            "choice_ci95": wilson_interval(sum(chosen), len(chosen)),
            "dense_agreement": sum(r["same_as_dense"] for r in rs) / n if n else 0.0,
            "top1_agreement": statistics.fmean(top1) if top1 else float("nan"),
            "kl_vs_dense": statistics.fmean(kl) if kl else float("nan"),
            "answer_ms": statistics.median(r["answer_ms"] for r in rs) if rs else 0.0,
            "prefill_ms": statistics.median(r["prefill_ms"] for r in rs) if rs else 0.0,
            "decode_ms_per_pass": statistics.median(per_pass) if per_pass else None,
            "decode_passes": statistics.fmean(r["decode_passes"] for r in rs) if rs else 0.0,
        }
    return out


def run_needles(
    adapter: VLMAdapter, sets: list[NeedleSet], cfg: NeedleConfig, progress: bool = True, dense_cache=None
) -> dict:
    """Every policy over every stream: answers (``answer_needles``) and, per stream, the
    attention-level replay of dense's recording (``runner.run_policies``: recall, out_rel_err,
    select / transfer / attention ms, and the device KV bytes the policy held at its peak, the
    largest over the streams). Returns {"policies": {name: summary}, "records": [...]}.
    ``dense_cache``: as for ``answer_needles``."""
    from tqdm import tqdm

    from mosaic_ros.runtime.bench.runner import BenchConfig, run_policies

    names = list(dict.fromkeys(cfg.policies))
    total = sum(len(s.questions) for s in sets) * len(set(names) | {"dense"})
    records: list[dict] = []
    replay: dict[str, list[tuple[int, dict]]] = {name: [] for name in names}
    sinks = adapter.system_chunk(PositionCursor()).n_tokens
    with tqdm(total=total, desc="needles", disable=not progress, leave=False) as bar:
        for turn, needle_set in enumerate(sets):
            stream_records, workload = answer_needles(
                adapter,
                needle_set,
                cfg,
                on_question=lambda: bar.update(1),
                dense_cache=dense_cache,
                turn=turn,
            )
            records += stream_records
            bench = BenchConfig(
                policies=names,
                kv=PolicyConfig(
                    budget_tokens=cfg.budget_tokens, sink_tokens=sinks, window_tokens=cfg.window_tokens
                ),
                device=str(adapter.device),
                options=cfg.options,
                progress=False,
                maintain_budget_ms=cfg.maintain_ms,
                isolate=False,  # the replay's ingest figures are not reported: no need for fresh heaps
            )
            result = run_policies(workload, bench)["policies"]
            for name in names:
                replay[name].append((len(stream_records), result[name]))
    summary = summarize(records, names)
    for name in names:
        weights = [n for n, _ in replay[name]]
        runs = [r for _, r in replay[name]]
        summary[name]["recall"] = _weighted([r["recall"] for r in runs], weights)
        summary[name]["out_rel_err"] = _weighted([r["out_rel_err"] for r in runs], weights)
        summary[name]["device_kv_bytes_peak"] = max(r["device_kv_bytes_peak"] for r in runs)
        timed = [q for r in runs for q in r["per_question"]]
        for key in ("select_ms", "transfer_ms", "attn_ms", "total_ms"):
            summary[name][f"replay_{key}"] = statistics.median(q[key] for q in timed)
    return {"policies": summary, "records": records}


def _weighted(values: list[float], weights: list[int]) -> float:
    return sum(v * w for v, w in zip(values, weights, strict=True)) / max(sum(weights), 1)
