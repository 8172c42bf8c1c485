"""Known answers instead of a model: for tasks whose answer is known, and for testing the
loops end to end on CPU.

Generator: answers with the request's `reference`; a request without one gets the scripted
`replies` (completion i is `replies[i % len(replies)]`), or a `scripts` entry's replies
when its key is in the last message (a scripted judge that votes and scores difficulty).

Judge, for a request with a `reference`, rates against it:
- visual faithfulness: 5 when the response contains the reference answer (as whole words),
  else 1 + 4 x the word-level F1 between response and reference, rounded;
- helpfulness: the same rating (on a known-answer task, the correct answer is the help);
- ethical considerations: `unrated` (nothing to compare against).
`generate` mode writes the rating in the documented reply format and parses it back;
`logprob` mode gives the rating with probability 1.
A request without a reference gets the scripted `replies` (aspect j: `replies[j % len]`),
read by the same strict parser as a model's reply: this is how a judge's malformed
replies are produced on purpose, in tests and demos.
"""
from __future__ import annotations

import re
from collections import Counter

from vlit.config import ReferenceBackendConfig
from vlit.serve import rubric
from vlit.serve.backends import Backend, Completion, Generation, GenerationRequest, JudgeItem, reply_score
from vlit.serve.protocol import AspectScore, RequestError


def _words(text: str) -> list[str]:
    return re.findall(r"[a-z0-9]+", text.lower())


def _contains(words: list[str], answer: list[str]) -> bool:
    n = len(answer)
    return any(words[i: i + n] == answer for i in range(len(words) - n + 1))


def reference_rating(response: str, reference: str) -> tuple[int, str]:
    got, want = _words(response), _words(reference)
    if not want:
        raise RequestError(400, "reference: the reference answer has no words to compare against", param="reference")
    if _contains(got, want):
        return 5, "The response contains the reference answer."
    common = sum((Counter(got) & Counter(want)).values())
    f1 = 0.0 if common == 0 else 2 * common / (len(got) + len(want))
    return 1 + round(4 * f1), f"The response does not contain the reference answer (word F1 {f1:.2f})."


class ReferenceBackend(Backend):
    kind = "reference"

    def __init__(self, cfg: ReferenceBackendConfig):
        self.replies = list(cfg.replies)
        self.scripts = dict(cfg.scripts)

    def _scripted_replies(self, req: GenerationRequest) -> list[str]:
        last = req.messages[-1].text if req.messages else ""
        return next((replies for key, replies in self.scripts.items() if key in last), self.replies)

    def check(self, req: GenerationRequest) -> None:
        if not self._scripted_replies(req) and req.reference is None:
            raise RequestError(400, "the reference generator answers with the request's `reference` "
                                    "(send it in the body, e.g. the openai client's extra_body)", param="reference")

    def generate(self, reqs: list[GenerationRequest]) -> list[Generation]:
        out = []
        for r in reqs:
            replies = self._scripted_replies(r)
            texts = [r.reference if r.reference is not None else replies[i % len(replies)] for i in range(r.n)]
            # No tokenizer here: usage counts words.
            out.append(Generation([Completion(t, "stop", len(t.split())) for t in texts], prompt_tokens=0))
        return out

    def check_judge(self, item: JudgeItem) -> None:
        if not self.replies and item.reference is None:
            raise RequestError(400, "the reference judge rates against the request's `reference` answer; "
                                    "send `reference`", param="reference")

    def judge(self, items: list[JudgeItem]) -> list[dict[str, AspectScore] | Exception]:
        return [self._judge_one(item) for item in items]

    def _judge_one(self, item: JudgeItem) -> dict[str, AspectScore] | Exception:
        if item.reference is None:
            return {a: self._scripted(self.replies[j % len(self.replies)], item.mode)
                    for j, a in enumerate(item.aspects)}
        try:
            rating, why = reference_rating(item.response, item.reference)
        except RequestError as e:
            return e
        scores = {}
        for aspect in item.aspects:
            if aspect == "ethical_considerations":
                scores[aspect] = AspectScore(status="unrated", rationale="The reference judge cannot rate ethics.")
            elif item.mode == "generate":
                scores[aspect] = reply_score(rubric.format_reply(rating, why))
            else:
                dist = [1.0 if k == rating else 0.0 for k in range(1, 6)]
                scores[aspect] = AspectScore(status="ok", rating=float(rating), distribution=dist, rationale=why)
        return scores

    @staticmethod
    def _scripted(reply: str, mode: str) -> AspectScore:
        score = reply_score(reply)
        if mode == "logprob" and score.status == "ok":
            rating = int(score.rating)
            score.distribution = [1.0 if k == rating else 0.0 for k in range(1, 6)]
        return score
