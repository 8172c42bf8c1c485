"""The judge's part of quality control (the review, section 4.2.3): correctness by a
majority vote over m sampled verdicts, and complexity as a 1-10 difficulty score.

Both are chat requests to the model named by `quality.judge`, served in the app's
generator pool (a GPT-4V-class endpoint or a local VLM is served there like any other
model; the judges' pool holds the VLFeedback rubric, which asks other questions). The
reply formats are fixed and stated in the prompts; the parsers accept exactly them, so a
reply in another shape is counted as unparseable instead of being read as a vote.
"""
from __future__ import annotations

import re

from vlit.serve.client import user_message
from vlit.serve.rubric import neutralize

VERDICT_PROMPT = (
    "You check an AI assistant's answer to an instruction about an image. Look at the image, "
    "read the instruction and the answer, and decide whether the answer is correct: everything "
    "it states about the image is true and it does what the instruction asks.\n"
    "Reply in exactly this format, with nothing before or after it:\n"
    "Verdict: <correct or incorrect>\n"
    "Reason: <why, in one sentence>\n\n"
    "Instruction: {instruction}\nAnswer: {response}"
)
DIFFICULTY_PROMPT = (
    "Rate how difficult this instruction about an image is for a vision-language assistant, from 1 "
    "(a glance at the image answers it) to 10 (it needs fine detail, counting, reading text, "
    "outside knowledge and several steps of reasoning together).\n"
    "Reply in exactly this format, with nothing before or after it:\n"
    "Difficulty: <a whole number from 1 to 10>\n"
    "Reason: <why, in one sentence>\n\n"
    "Instruction: {instruction}"
)
_VERDICT = re.compile(r"Verdict:[ \t]*(correct|incorrect)[ \t]*\nReason:[ \t]*(\S.*)", re.S | re.I)
_DIFFICULTY = re.compile(r"Difficulty:[ \t]*(10|[1-9])[ \t]*\nReason:[ \t]*(\S.*)", re.S)


def parse_verdict(text: str) -> bool | None:
    m = _VERDICT.fullmatch((text or "").strip())
    return None if m is None else m.group(1).lower() == "correct"


def parse_difficulty(text: str) -> int | None:
    m = _DIFFICULTY.fullmatch((text or "").strip())
    return None if m is None else int(m.group(1))


def majority(votes: list[bool | None]) -> dict:
    """The vote over the parsed verdicts: `judge_correct` is 1.0 or 0.0 when more than half
    of the m samples agree, else null (`judge_error` says why)."""
    valid = [v for v in votes if v is not None]
    yes = sum(valid)
    out = {"judge_votes": len(votes), "judge_votes_valid": len(valid), "judge_votes_correct": yes,
           "judge_correct": None, "judge_error": None}
    if yes * 2 > len(votes):
        out["judge_correct"] = 1.0
    elif (len(valid) - yes) * 2 > len(votes):
        out["judge_correct"] = 0.0
    else:
        out["judge_error"] = (f"no majority of {len(votes)} votes: {yes} correct, {len(valid) - yes} incorrect, "
                              f"{len(votes) - len(valid)} unparseable")
    return out


def verdict_request(row: dict, model: str, votes: int, temperature: float, seed: int) -> dict:
    text = VERDICT_PROMPT.format(instruction=neutralize(row["instruction"]), response=neutralize(row["response"]))
    return {"model": model, "messages": [user_message(text, row["image"])], "n": votes, "temperature": temperature,
            "max_tokens": 96, "seed": seed}


def difficulty_request(row: dict, model: str, seed: int) -> dict:
    text = DIFFICULTY_PROMPT.format(instruction=neutralize(row["instruction"]))
    return {"model": model, "messages": [user_message(text, row["image"])], "n": 1, "temperature": 0.0,
            "max_tokens": 96, "seed": seed}
