"""Where the real LM's question attention goes on the needle workload, and what each policy keeps.

    .venv/bin/python scripts/needle_attention.py --streams 6 --budget 128 --window 32 --maintain-ms 50 \
        --json out.json

Records dense's stream and questions (``bench.needles``, real SmolLM2 weights, oracle vision
tower: each event's sentence embeddings stand in for its visual tokens), then per layer and
question computes the dense attention of the question's tokens over the context (RoPE applied,
as the model attends) and reports:

- the share of that attention on the sinks (preamble), on the needle event (the event holding
  the answer: time marker + sentence), on the answer's own tokens, and on the local window;
- per policy (each replayed at the budget): recall (dense mass on the tokens it hands
  attention) and how many of the answer's tokens it keeps, per layer;
- two oracles at the same budget, sinks and window included: the top tokens by the true
  (RoPE) attention, and by position-free (pre-RoPE) logits as ``token_topk`` scores;
- for ``mosaic``, per layer: the size of the cluster(s) holding the answer's tokens, the share
  of their members that come from the needle event, and their rank by ``ClusterIndex.score``;
- the same shares and each policy's recall for the query that writes the answer: the last
  token of the question followed by the answer's prefix ("... The number on the red locker
  is"), whose next token is the answer's first. Policies select with the question's queries
  (as they do), and are judged against this later query's attention (``*_at_answer``);
  ``*_reselected_*``: the same policy selecting again with that later query (what fetching
  again while the answer is written would give).

Everything is averaged over questions; per-layer rows are printed for every fifth layer and
written to JSON in full.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys

import torch

from mosaic_ros.runtime.bench.needles import NeedleConfig, PolicyStream, answer_needles, generate_needles
from mosaic_ros.runtime.bench.runner import ingest_frame
from mosaic_ros.runtime.kv import policies  # noqa: F401  (registers the built-in policies)
from mosaic_ros.runtime.kv.policy import PolicyConfig, make_policy
from mosaic_ros.runtime.kv.rope import apply_rotary
from mosaic_ros.runtime.models import load_model

POLICIES = ("window", "token_topk", "rekv", "livevlm", "mosaic")


def _probabilities(q_pre, keys_pre, positions, q_positions, rotary):
    """Dense attention (H_q, L_q, T) of the question over the context, RoPE applied; the
    question's own tokens are left out (the shares are of the context's mass)."""
    cos_k, sin_k = rotary(positions)
    cos_q, sin_q = rotary(q_positions)
    k = apply_rotary(keys_pre.transpose(0, 1).float(), cos_k, sin_k)  # (H_kv, T, D)
    q = apply_rotary(q_pre.float(), cos_q, sin_q)  # (H_q, L_q, D)
    group = q.shape[0] // k.shape[0]
    logits = torch.einsum("hld,htd->hlt", q, k.repeat_interleave(group, dim=0)) * q.shape[-1] ** -0.5
    return torch.softmax(logits, dim=-1), logits


def _pre_rope_logits(q_pre, keys_pre):
    k = keys_pre.transpose(0, 1).float()
    group = q_pre.shape[0] // k.shape[0]
    return torch.einsum("hld,htd->hlt", q_pre.float(), k.repeat_interleave(group, dim=0))


def _topk_recall(probs, scores, keep, budget):
    """Recall of the best ``budget`` tokens by ``scores`` chosen per query head (summed over the
    question's tokens; an upper bound for a per-KV-head choice), ``keep`` (T,) bool forced in."""
    hq = probs.shape[0]
    out = []
    for h in range(hq):
        s = scores[h].sum(0).clone()
        s[keep] = float("inf")
        top = torch.topk(s, min(budget, s.numel())).indices
        out.append(float(probs[h][:, top].sum(-1).mean()))
    return statistics.fmean(out)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--streams", type=int, default=6)
    p.add_argument("--frames", type=int, default=24)
    p.add_argument("--needles", type=int, default=6)
    p.add_argument("--budget", type=int, default=128)
    p.add_argument("--window", type=int, default=32)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--maintain-ms", type=float, default=50.0, help="policy maintenance after each event")
    p.add_argument("--json", dest="json_path")
    args = p.parse_args(argv)
    adapter = load_model("smollm2-llava:135m-instruct", device="cpu")
    n_layers = adapter.num_layers
    rows: dict[str, list[list[float]]] = {}

    def add(key: str, layer: int, value: float) -> None:
        rows.setdefault(key, [[] for _ in range(n_layers)])[layer].append(value)

    for seed in range(args.seed, args.seed + args.streams):
        needle_set = generate_needles(seed, args.frames, args.needles)
        cfg = NeedleConfig(policies=["dense"], budget_tokens=args.budget, window_tokens=args.window)
        _, workload = answer_needles(adapter, needle_set, cfg)
        chunks = [workload.chunk(i) for i in range(workload.num_chunks)]
        sinks = chunks[0].meta.num_tokens
        positions = torch.cat([c.meta.positions for c in chunks], dim=1)
        total = positions.shape[1]
        starts = [0]
        for c in chunks:
            starts.append(starts[-1] + c.meta.num_tokens)
        keys = [torch.cat([c.keys[layer] for c in chunks]) for layer in range(n_layers)]
        dense = PolicyStream(
            adapter,
            "dense",
            PolicyConfig(budget_tokens=1 << 20, sink_tokens=sinks, window_tokens=args.window),
            torch.float32,
        )
        for event in needle_set.events:
            dense.ingest_event(event)
        replayed = {}
        for name in POLICIES:
            policy = make_policy(
                name,
                workload.geometry,
                PolicyConfig(budget_tokens=args.budget, sink_tokens=sinks, window_tokens=args.window),
            )
            for c in chunks:
                ingest_frame(policy, c, args.maintain_ms)
            replayed[name] = policy
        window_ids = torch.arange(max(sinks, total - args.window), total)
        keep = torch.zeros(total, dtype=torch.bool)
        keep[:sinks] = True
        keep[window_ids] = True
        for question, asked in zip(needle_set.questions, workload.questions(), strict=True):
            slot = next(i for i, e in enumerate(needle_set.events) if question.answer in e.text)
            lo, hi = starts[slot + 1], starts[slot + 2]  # chunk 0 is the preamble
            event = torch.zeros(total, dtype=torch.bool)
            event[lo:hi] = True
            answer_ids = adapter.encode_text(" " + question.answer)
            sentence = adapter.encode_text(" " + needle_set.events[slot].text)
            at = next(i for i in range(len(sentence)) if sentence[i : i + len(answer_ids)] == answer_ids)
            marker = (hi - lo) - len(sentence)
            answer = torch.zeros(total, dtype=torch.bool)
            answer[lo + marker + at : lo + marker + at + len(answer_ids)] = True
            answer_tokens = torch.nonzero(answer).flatten()
            asked_chunk = adapter.question_chunk(question.question, dense.cursor)
            prefix_chunk = adapter.tokens_chunk(adapter.encode_text(question.prefix), asked_chunk.cursor)
            later = adapter.concat_chunks([asked_chunk, prefix_chunk])
            dense.bridge.begin_question(None, capture=True)
            with torch.no_grad(), dense.bridge.question_step(later.token_positions) as cache:
                adapter.forward(later, cache)
            answer_queries = [q[:, -1:].clone() for q in dense.bridge.captured_queries]
            dense.bridge.end_question()
            for layer in range(n_layers):
                q_pre = asked.queries[layer]
                probs, _ = _probabilities(q_pre, keys[layer], positions, asked.positions, adapter.rotary)
                mass = probs.sum(dim=(0, 1)) / (probs.shape[0] * probs.shape[1])  # (T,)
                add("share_sinks", layer, float(mass[:sinks].sum()))
                add("share_needle_event", layer, float(mass[event].sum()))
                add("share_answer_tokens", layer, float(mass[answer].sum()))
                add("share_window", layer, float(mass[window_ids].sum()))
                add("answer_token_share_of_tokens", layer, float(answer.sum()) / total)
                add("oracle_rope_topk_recall", layer, _topk_recall(probs, probs, keep, args.budget))
                pre = _pre_rope_logits(q_pre, keys[layer]).softmax(-1)
                add("oracle_prerope_topk_recall", layer, _topk_recall(probs, pre, keep, args.budget))
                probs_b, _ = _probabilities(
                    answer_queries[layer],
                    keys[layer],
                    positions,
                    later.token_positions[:, -1:],
                    adapter.rotary,
                )
                mass_b = probs_b.sum(dim=(0, 1)) / probs_b.shape[0]
                add("share_sinks_at_answer", layer, float(mass_b[:sinks].sum()))
                add("share_needle_event_at_answer", layer, float(mass_b[event].sum()))
                add("share_answer_tokens_at_answer", layer, float(mass_b[answer].sum()))
                for name, policy in replayed.items():
                    policy.begin_question(None)
                    ctx = policy.retrieve(layer, q_pre)
                    policy.end_question()
                    ids = ctx.token_ids.cpu()  # (H_kv, n): each KV head its own set
                    group = probs.shape[0] // ids.shape[0]
                    recall = [
                        float(probs[h][:, ids[h // group]].sum(-1).mean()) for h in range(probs.shape[0])
                    ]
                    kept = [
                        float(torch.isin(answer_tokens, ids[g]).float().mean()) for g in range(ids.shape[0])
                    ]
                    add(f"{name}_recall", layer, statistics.fmean(recall))
                    recall_b = [float(probs_b[h][:, ids[h // group]].sum()) for h in range(probs.shape[0])]
                    add(f"{name}_recall_at_answer", layer, statistics.fmean(recall_b))
                    policy.begin_question(None)
                    late = policy.retrieve(layer, answer_queries[layer]).token_ids.cpu()
                    policy.end_question()
                    recall_c = [float(probs_b[h][:, late[h // group]].sum()) for h in range(probs.shape[0])]
                    kept_c = [
                        float(torch.isin(answer_tokens, late[g]).float().mean()) for g in range(late.shape[0])
                    ]
                    add(f"{name}_reselected_recall_at_answer", layer, statistics.fmean(recall_c))
                    add(f"{name}_reselected_answer_tokens_kept", layer, statistics.fmean(kept_c))
                    add(f"{name}_answer_tokens_kept", layer, statistics.fmean(kept))
                index = replayed["mosaic"]._layers[layer].index
                cids = torch.unique(index.units_of(answer_tokens))
                cids = cids[cids >= 0]
                if cids.numel():
                    scores = index.score(q_pre).cpu()
                    order = torch.argsort(scores, descending=True)
                    ranks = [int((order == c).nonzero()[0, 0]) for c in cids.tolist()]
                    members = torch.cat([index.members(c) for c in cids.tolist()])
                    add("mosaic_answer_cluster_tokens", layer, float(members.numel()) / cids.numel())
                    add("mosaic_answer_cluster_from_event", layer, float(event[members].float().mean()))
                    add("mosaic_answer_cluster_best_rank", layer, float(min(ranks)))
                    add("mosaic_clusters", layer, float(index.num_clusters))
        print(f"stream {seed} done", file=sys.stderr, flush=True)

    table = {
        k: [statistics.fmean(v) if v else float("nan") for v in per_layer] for k, per_layer in rows.items()
    }
    keys_shown = list(table)
    print("layer " + " ".join(f"{k[:14]:>14}" for k in keys_shown))
    for layer in range(0, n_layers, 5):
        print(f"{layer:>5} " + " ".join(f"{table[k][layer]:>14.3f}" for k in keys_shown))
    print("mean  " + " ".join(f"{statistics.fmean(table[k]):>14.3f}" for k in keys_shown))
    if args.json_path:
        with open(args.json_path, "w") as f:
            json.dump({"command": " ".join(sys.argv), "per_layer": table}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
