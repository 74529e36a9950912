"""scripts/squad_needles.py: SQuAD-shaped JSON to needle streams that ``read_needles`` reads."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

from mosaic_ros.runtime.bench.needles import read_needles

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "squad_needles.py"
_spec = importlib.util.spec_from_file_location("squad_needles", SCRIPT)
squad = importlib.util.module_from_spec(_spec)
sys.modules["squad_needles"] = squad  # dataclasses look their module up there
_spec.loader.exec_module(squad)

# Made-up text. The answer "Dr. Pell. Then" spans a sentence boundary the splitter would cut.
CONTEXT_A = (
    "The lighthouse at Corran Point was built in 1871 by Dr. Alma Reyes. "
    "Its lamp burned whale oil until the keeper, Tomas Vint, fitted a paraffin burner. "
    "Ships saw the light from twelve miles out! "
    "The keeper wrote to Dr. Pell. Then the council paid for a new lens."
)
CONTEXT_B = (
    "A ferry named Silver Wren crossed the strait each morning. "
    "Its captain, Ines Moro, kept a log in green ink. "
    "The strait froze in the winter of 1903."
)


def _qa(question, text, context, impossible=False):
    answers = [] if impossible else [{"text": text, "answer_start": context.index(text)}]
    return {"question": question, "id": question[:8], "answers": answers, "is_impossible": impossible}


def _squad(tmp_path: Path) -> Path:
    data = {
        "version": "1.1",
        "data": [
            {
                "title": "Lighthouse",
                "paragraphs": [
                    {
                        "context": CONTEXT_A,
                        "qas": [
                            _qa("When was the lighthouse built?", "1871", CONTEXT_A),
                            _qa("Who fitted a paraffin burner?", "Tomas Vint", CONTEXT_A),
                            _qa("Whom did the keeper write to?", "Dr. Pell. Then", CONTEXT_A),
                            _qa("What did the lamp burn first?", "whale oil", CONTEXT_A),
                            _qa("Who was the keeper?", "keeper", CONTEXT_A),  # in several sentences
                            _qa("What colour was the lamp?", "", CONTEXT_A, impossible=True),
                        ],
                    },
                    {
                        "context": CONTEXT_B,
                        "qas": [
                            _qa("What was the ferry called?", "Silver Wren", CONTEXT_B),
                            _qa("Ink colour?", "green ink", CONTEXT_B),
                            # wrong offset: does not match the context there
                            {"question": "Bad?", "answers": [{"text": "strait", "answer_start": 0}]},
                        ],
                    },
                ],
            }
        ],
    }
    path = tmp_path / "squad.json"
    path.write_text(json.dumps(data))
    return path


def test_streams_parse_with_sentence_events_and_located_answers(tmp_path):
    summary = squad.convert(_squad(tmp_path), tmp_path / "out", streams=3, questions_per_stream=10)
    assert summary["streams"] == 1 and summary["files"] == [str(tmp_path / "out" / "s00.jsonl")]
    stream = read_needles(summary["files"][0])
    texts = [e.text for e in stream.events]
    assert texts == [
        "The lighthouse at Corran Point was built in 1871 by Dr. Alma Reyes.",
        "Its lamp burned whale oil until the keeper, Tomas Vint, fitted a paraffin burner.",
        "Ships saw the light from twelve miles out!",
        "The keeper wrote to Dr. Pell. Then the council paid for a new lens.",  # span kept whole
        "A ferry named Silver Wren crossed the strait each morning.",
        "Its captain, Ines Moro, kept a log in green ink.",
        "The strait froze in the winter of 1903.",
    ]
    assert [e.t for e in stream.events] == [2.0 * i for i in range(7)]
    answers = {q.question: q.answer for q in stream.questions}
    assert answers == {
        "When was the lighthouse built?": "1871",
        "Who fitted a paraffin burner?": "Tomas Vint",
        "Whom did the keeper write to?": "Dr. Pell. Then",
        "What did the lamp burn first?": "whale oil",
        "What was the ferry called?": "Silver Wren",
        "Ink colour?": "green ink",
    }  # not: the answer in several events, the unanswerable one, the mismatched offset
    home = {"1871": 0, "Tomas Vint": 1, "Dr. Pell. Then": 3, "whale oil": 1, "Silver Wren": 4, "green ink": 5}
    for q in stream.questions:
        assert q.choices == () and q.prefix == ""
        hits = [i for i, text in enumerate(texts) if q.answer.lower() in text.lower()]
        assert hits == [home[q.answer]]
        assert q.depth == pytest.approx(home[q.answer] / 6)
    assert summary["events"] == 7 and summary["questions"] == 6


def test_token_target_groups_paragraphs_and_caps_questions(tmp_path):
    source = _squad(tmp_path)
    summary = squad.convert(
        source, tmp_path / "out", streams=5, per_article=5, questions_per_stream=2, tokens=20
    )
    assert summary["streams"] == 2  # each paragraph alone exceeds 20 tokens: one group each
    first, second = (read_needles(f) for f in summary["files"])
    assert len(first.events) == 4 and len(second.events) == 3
    assert [q.answer for q in first.questions] == ["1871", "Tomas Vint"]  # SQuAD's order, capped
    assert [q.answer for q in second.questions] == ["Silver Wren", "green ink"]
    one = squad.convert(source, tmp_path / "one", streams=5, per_article=1, tokens=20)
    assert one["streams"] == 1


def test_splitter_keeps_abbreviations_and_initials():
    text = "Mr. Vale met J. R. Holt in the U.S. Army. He left at 9 a.m. Next day it rained."
    pieces = [s.text for s in squad.split_sentences(text, [])]
    # an initialism (a.m.) before a capital is not taken as an end: a sentence too many is worse
    assert pieces == ["Mr. Vale met J. R. Holt in the U.S. Army.", "He left at 9 a.m. Next day it rained."]
    for s in squad.split_sentences(text, []):
        assert text[s.start : s.end] == s.text


@pytest.mark.parametrize(
    "content, message",
    [
        ("{not json", "not JSON"),
        (json.dumps({"version": "1.1"}), "expected"),
        (json.dumps({"data": [{"title": "x"}]}), "article 0 has no list of paragraphs"),
        (json.dumps({"data": [{"paragraphs": [{"qas": []}]}]}), "paragraph 0 has no context"),
        (
            json.dumps(
                {"data": [{"paragraphs": [{"context": "A b.", "qas": [{"question": "q", "answers": [{}]}]}]}]}
            ),
            "answer without text/answer_start",
        ),
    ],
)
def test_malformed_input_is_a_clear_error(tmp_path, content, message):
    path = tmp_path / "bad.json"
    path.write_text(content)
    with pytest.raises(ValueError, match=message):
        squad.convert(path, tmp_path / "out")
    result = subprocess.run(
        [sys.executable, str(SCRIPT), str(path), str(tmp_path / "out")], capture_output=True, text=True
    )
    assert result.returncode == 1 and "error:" in result.stderr and message.split()[0] in result.stderr
