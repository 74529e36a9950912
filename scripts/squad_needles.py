#!/usr/bin/env python3
"""Needle streams from SQuAD: events and questions the project did not write.

Reads a local SQuAD JSON file (v1.1, or v2.0 whose unanswerable questions are skipped) and
writes one JSON-lines stream per selected paragraph group into an output folder, in the format
``mosaic-ros-bench --needles FILE`` reads (``read_needles`` in ``runtime/bench/needles.py``):

- events: the group's paragraphs split into sentences, one ``{"t": seconds, "text": ...}``
  event per sentence, ``t`` 2 s apart from 0;
- questions: SQuAD's own questions about those paragraphs, ``{"question": ..., "answer": ...}``
  with ``answer`` = SQuAD's first answer text, no choices and no prefix (no candidates are
  written: the forced choice does not apply, only the greedy answer is scored).

Selection is deterministic: articles in file order; within an article, consecutive paragraphs
from its first, as many as fit ``--tokens`` (estimated as words x 1.3; a paragraph longer than
that alone is a group by itself), up to ``--streams-per-article`` groups; the first ``--streams``
groups that have a question are written (``s00.jsonl``, ``s01.jsonl``, ...). A question is kept
when its first answer matches the context at its offset, lies wholly inside one sentence (the
splitter never splits inside a first answer) and its text occurs (case-insensitive) in no other
event of the stream, so its depth is that of its sentence; the first ``--questions-per-stream``
such questions, in SQuAD's order, are written.

Usage (one-paragraph streams of ~180 event tokens: on ~450-token streams the 135M model's
greedy answer held SQuAD's answer for 6-13% of questions even with dense attention)::

    python scripts/squad_needles.py dev-v1.1.json squad_streams --streams 30 \\
        --streams-per-article 6 --questions-per-stream 6 --tokens 250
    mosaic-ros-bench --needles squad_streams --max-new-tokens 32    # every stream, in name order

License: SQuAD (Rajpurkar et al.) is distributed under CC BY-SA 4.0. This script does not
download it and nothing of it is part of this project: it reads a file you pass in, and the
streams it writes are derived from SQuAD under the same license.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from dataclasses import dataclass
from pathlib import Path

FRAME_SECONDS = 2.0
# A sentence ends at . ! or ? (and any closing quote/bracket) before whitespace and a capital,
# digit or opening quote/bracket; not after a known abbreviation or a single-letter initial.
_BOUNDARY = re.compile(r"[.!?][\"')\]]*(?=\s+[\"'(\[]?[A-Z0-9])")
_ABBREVIATIONS = {
    "mr", "mrs", "ms", "dr", "st", "jr", "sr", "prof", "gen", "col", "lt", "sgt", "capt", "rev",
    "vs", "etc", "e.g", "i.e", "no", "fig", "mt", "ft", "approx", "inc", "ltd", "co", "corp",
    "jan", "feb", "mar", "apr", "jun", "jul", "aug", "sep", "sept", "oct", "nov", "dec", "ca", "c",
}  # fmt: skip


@dataclass
class Sentence:
    start: int
    end: int  # exclusive, over the paragraph's context
    text: str


def tokens_estimate(text: str) -> int:
    """Rough LM token count: words x 1.3."""
    return round(len(text.split()) * 1.3)


def split_sentences(context: str, protected: list[tuple[int, int]]) -> list[Sentence]:
    """Sentences of ``context`` with their character spans; never ends one inside a
    ``protected`` span ``[start, end)``."""
    cuts = []
    for match in _BOUNDARY.finditer(context):
        end = match.end()
        word = context[: match.start()].rsplit(None, 1)[-1] if context[: match.start()].strip() else ""
        word = word.lstrip("\"'([").lower()
        if context[match.start()] == "." and (word in _ABBREVIATIONS or re.fullmatch(r"[a-z]", word)):
            continue
        if re.fullmatch(r"(?:[a-z]\.)+[a-z]", word):  # U.S. / e.g. style initialisms
            continue
        if any(s < end < e for s, e in protected):
            continue
        cuts.append(end)
    sentences = []
    begin = 0
    for end in [*cuts, len(context)]:
        piece = context[begin:end]
        stripped = piece.strip()
        if stripped:
            offset = begin + (len(piece) - len(piece.lstrip()))
            sentences.append(Sentence(offset, offset + len(stripped), stripped))
        begin = end
    return sentences


def _first_answer(qa: dict, context: str) -> tuple[str, int] | None:
    """SQuAD's first answer (text, offset) when it is answerable and matches its offset."""
    if qa.get("is_impossible") or not qa.get("answers"):
        return None
    answer = qa["answers"][0]
    text, start = str(answer["text"]), int(answer["answer_start"])
    if not text.strip() or context[start : start + len(text)] != text:
        return None
    return text, start


def _check(data: object) -> list[dict]:
    if not isinstance(data, dict) or not isinstance(data.get("data"), list):
        raise ValueError('not a SQuAD file: expected {"data": [articles]}')
    for a, article in enumerate(data["data"]):
        if not isinstance(article, dict) or not isinstance(article.get("paragraphs"), list):
            raise ValueError(f"not a SQuAD file: article {a} has no list of paragraphs")
        for p, paragraph in enumerate(article["paragraphs"]):
            if not isinstance(paragraph, dict) or not isinstance(paragraph.get("context"), str):
                raise ValueError(f"not a SQuAD file: article {a} paragraph {p} has no context text")
            qas = paragraph.get("qas")
            if not isinstance(qas, list) or not all(isinstance(q, dict) and "question" in q for q in qas):
                raise ValueError(f"not a SQuAD file: article {a} paragraph {p} has no list of questions")
            for q in qas:
                for answer in q.get("answers", []):
                    if not isinstance(answer, dict) or "text" not in answer or "answer_start" not in answer:
                        raise ValueError(
                            f"not a SQuAD file: article {a} paragraph {p} has an answer "
                            "without text/answer_start"
                        )
    return data["data"]


def build_stream(paragraphs: list[dict], questions_per_stream: int) -> tuple[list[dict], list[dict]]:
    """Events (one per sentence) and kept questions of one paragraph group."""
    events: list[dict] = []
    candidates: list[tuple[int, dict]] = []  # (event index, question record)
    for paragraph in paragraphs:
        context = paragraph["context"]
        answers = [(qa, _first_answer(qa, context)) for qa in paragraph["qas"]]
        spans = [(s, s + len(t)) for _, found in answers if found for t, s in [found]]
        sentences = split_sentences(context, spans)
        base = len(events)
        for sentence in sentences:
            events.append({"t": FRAME_SECONDS * len(events), "text": sentence.text})
        for qa, found in answers:
            if not found:
                continue
            text, start = found
            inside = [i for i, s in enumerate(sentences) if s.start <= start and start + len(text) <= s.end]
            if len(inside) == 1:
                candidates.append(
                    (base + inside[0], {"question": str(qa["question"]).strip(), "answer": text})
                )
    questions = []
    for index, record in candidates:
        needle = record["answer"].lower()
        if [i for i, e in enumerate(events) if needle in e["text"].lower()] == [index]:
            questions.append(record)
        if len(questions) == questions_per_stream:
            break
    return events, questions


def paragraph_groups(article: dict, tokens: int, per_article: int) -> list[list[dict]]:
    """Consecutive paragraphs from the article's first, up to ``tokens`` each group."""
    groups: list[list[dict]] = []
    current: list[dict] = []
    size = 0
    for paragraph in article["paragraphs"]:
        n = tokens_estimate(paragraph["context"])
        if current and size + n > tokens:
            groups.append(current)
            if len(groups) == per_article:
                return groups
            current, size = [], 0
        current.append(paragraph)
        size += n
    if current and len(groups) < per_article:
        groups.append(current)
    return groups


def convert(
    source: str | Path,
    out_dir: str | Path,
    streams: int = 18,
    per_article: int = 1,
    questions_per_stream: int = 6,
    tokens: int = 450,
) -> dict:
    """Write the streams; returns a summary {streams, events, questions, tokens, files}."""
    if streams <= 0 or per_article <= 0 or questions_per_stream <= 0 or tokens <= 0:
        raise ValueError("streams, streams per article, questions per stream and tokens must be > 0")
    try:
        data = json.loads(Path(source).read_text(encoding="utf-8"))
    except json.JSONDecodeError as error:
        raise ValueError(f"{source}: not JSON ({error})") from error
    articles = _check(data)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    summary = {"streams": 0, "events": 0, "questions": 0, "tokens": 0, "files": []}
    for article in articles:
        for group in paragraph_groups(article, tokens, per_article):
            if summary["streams"] == streams:
                return summary
            events, questions = build_stream(group, questions_per_stream)
            if not questions:
                continue
            path = out / f"s{summary['streams']:02d}.jsonl"
            with path.open("w", encoding="utf-8") as f:
                for record in [*events, *questions]:
                    f.write(json.dumps(record, ensure_ascii=False) + "\n")
            summary["streams"] += 1
            summary["events"] += len(events)
            summary["questions"] += len(questions)
            summary["tokens"] += sum(tokens_estimate(e["text"]) for e in events)
            summary["files"].append(str(path))
    return summary


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("squad", help="a local SQuAD JSON file (e.g. dev-v1.1.json)")
    p.add_argument("out", help="output folder for s00.jsonl, s01.jsonl, ...")
    p.add_argument("--streams", type=int, default=18, help="streams to write")
    p.add_argument("--streams-per-article", type=int, default=1, help="paragraph groups taken per article")
    p.add_argument("--questions-per-stream", type=int, default=6, help="questions kept per stream (at most)")
    p.add_argument("--tokens", type=int, default=450, help="token target of a stream's events (words x 1.3)")
    args = p.parse_args(argv)
    try:
        s = convert(
            args.squad,
            args.out,
            args.streams,
            args.streams_per_article,
            args.questions_per_stream,
            args.tokens,
        )
    except (OSError, ValueError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    print(
        f"{s['streams']} streams, {s['events']} events, {s['questions']} questions, "
        f"~{s['tokens']} event tokens (~{s['tokens'] // max(s['streams'], 1)} per stream) in {args.out}"
    )
    if s["streams"] < args.streams:
        print(
            f"note: only {s['streams']} of {args.streams} streams: the file has fewer groups", file=sys.stderr
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
