"""The multiple-choice data of route's pool benchmark: sentiment, trivia, and distractors from other answers."""

import pytest

from malleable.data.choices import multiple_choice
from malleable.data.sentiment import polarity_sentences, sentiment_records
from malleable.errors import InputError

QA = [{"prompt": f"q{i}", "completion": a} for i, a in enumerate(["Paris", "Rome", " rome ", "Oslo", "Lima"])]


@pytest.mark.parametrize("k", [2, 3])
def test_choices_hold_the_gold_once_and_other_answers(k):
    rows = multiple_choice(QA, k=k, seed=1)
    assert [r["prompt"] for r in rows] == [q["prompt"] for q in QA]
    for q, r in zip(QA, rows):
        assert len(r["choices"]) == k and len(set(c.lower() for c in r["choices"])) == k
        assert r["completion"].strip().lower() == q["completion"].strip().lower()
        assert r["choices"].count(r["completion"]) == 1
        assert all(c.startswith(" ") and not c.startswith("  ") for c in r["choices"])
    assert rows[2]["completion"] == " Rome"  # one spelling per answer (the first), never its own distractor
    assert multiple_choice(QA, k=k, seed=1) == rows  # seeded
    assert any(multiple_choice(QA, k=k, seed=s) != rows for s in range(2, 6))


def test_too_few_distinct_answers_is_an_input_error():
    with pytest.raises(InputError, match="too few"):
        multiple_choice(QA[:2], k=3)


def test_polarity_file_reads_balanced_and_labelled():
    pytest.importorskip("gensim")
    pairs = polarity_sentences()
    assert len(pairs) == 200 and sum(label == "positive" for _, label in pairs) == 100
    rows = sentiment_records()
    assert all(r["completion"] in r["choices"] for r in rows)


def test_a_bad_polarity_line_is_named(tmp_path):
    f = tmp_path / "p.cor"
    f.write_text("__label__pos fine film\nno label here\n", encoding="latin-1")
    with pytest.raises(InputError, match=r"p\.cor:2:"):
        polarity_sentences(f)


def test_trivia_reads_pairs_and_skips_a_malformed_entry(tmp_path):
    from malleable.data.trivia import trivia_records

    f = tmp_path / "trivia.yml"
    f.write_text("conversations:\n- - Who wrote Hamlet?\n  - Shakespeare.\n- a lone string\n- - What is 2 + 2?\n"
                 "  - '4'\n")
    assert trivia_records(f) == [{"prompt": "Who wrote Hamlet?", "completion": "Shakespeare"},
                                 {"prompt": "What is 2 + 2?", "completion": "4"}]
    (tmp_path / "bad.yml").write_text("conversations: 3\n")
    with pytest.raises(InputError, match="no 'conversations' list"):
        trivia_records(tmp_path / "bad.yml")


def test_missing_chatterbot_corpus_is_named(monkeypatch):
    import importlib.util

    from malleable.data import trivia

    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    with pytest.raises(InputError, match="pip install --no-deps chatterbot-corpus"):
        trivia.trivia_path()
