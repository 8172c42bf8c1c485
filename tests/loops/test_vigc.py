"""VIGC's parser and VIC's sentence-by-sentence loop, with a scripted generator."""
from __future__ import annotations

import pytest

from vlit.loops.vigc import ParseError, correct, new_sentence, parse_qa, vic_prompt

SCRIPT = ["The circle is red.", "It sits on the left.", "No other shape is red."]


def test_parse_qa_is_strict():
    assert parse_qa("Question: What is red?\nAnswer: The circle. It is small.") == (
        "What is red?", "The circle. It is small.")
    for bad, reason in [("", "empty_reply"), ("Answer: yes", "not_question_answer"),
                        ("Question: a? Answer: b Question: c?", "not_question_answer"),
                        ("Question:\nAnswer: b", "not_question_answer"), ("just text", "not_question_answer")]:
        with pytest.raises(ParseError) as e:
            parse_qa(bad)
        assert e.value.reason == reason


def test_new_sentence_keeps_only_the_first_new_one():
    assert new_sentence("", "A b. C d.") == "A b."
    assert new_sentence("A b.", "A b.  C d! E.") == "C d!"
    assert new_sentence("A b.", "C d. E.") == "C d."
    assert new_sentence("A b. C d.", "A b. C d.") is None
    assert new_sentence("A b.", "   ") is None


def test_vic_loop_with_a_scripted_generator():
    """The scripted generator continues from the answer in its prompt and always says more
    than one sentence: the loop keeps one per round, stops at the end, or after R rounds."""
    seen_prompts = []

    def complete(active):
        replies = []
        for item in active:
            prompt = vic_prompt(item)
            seen_prompts.append(prompt)
            done = len([s for s in SCRIPT if s in item["vic_answer"]])
            replies.append(" ".join(SCRIPT[done:] + (["Extra tail."] if done < len(SCRIPT) else [])) if done < len(SCRIPT) else "")
        return replies

    items = [{"instruction": "Describe.", "question": "What is red?", "image": None}]
    [done] = correct(items, complete, rounds=10)
    assert done["vic_answer"] == " ".join(SCRIPT) and done["vic_rounds"] == 4 and done["vic_stop"] == "end"
    assert "Answer so far: The circle is red. It sits on the left." in seen_prompts[2]
    [cut] = correct(items, complete, rounds=2)
    assert cut["vic_answer"] == " ".join(SCRIPT[:2]) and cut["vic_stop"] == "rounds"
    [failed] = correct(items, lambda active: [None] * len(active), rounds=3)
    assert failed["vic_stop"] == "error" and failed["vic_rounds"] == 1
