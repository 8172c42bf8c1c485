"""LLaVA-Bench (in-the-wild): open-ended answers rated by a judge against a reference answer.

Release layout (local or s3://): questions.jsonl (question_id, image, text, category:
conv | detail | complex), context.jsonl (image, caption), the reference answers
(answers_gpt4.jsonl: question_id, text) and images/.

The protocol is LLaVA's llava/eval/eval_gpt_review_bench.py and summarize_gpt_review.py:
the judge sees the image's caption, the question, the reference answer as "Assistant 1"
and the model's as "Assistant 2", and replies with a first line "score1 score2" (1-10).
A category's relative score is mean(model score) / mean(reference score) * 100. Unlike
LLaVA, which averages a failed parse in as (-1, -1), an unparseable reply is counted
(`unparsed`) and left out of every mean.

The answers come from generation, not from likelihood scoring, so this suite is not among
`eval.benchmarks` but `eval.llava_bench`: `run_llava_bench` has the model answer through
a Serve generator over its export and the reviewing model review each answer through the
same app's chat; `llava_bench_scores` scores the reviews (again, from the published
prediction table, when a scorer changes).
"""
from __future__ import annotations

import hashlib
import json
from collections import defaultdict

from vlit import storage
from vlit.config import Config, ConfigError

CATEGORIES = ("conv", "detail", "complex")
SYSTEM = "You are a helpful and precise assistant for checking the quality of the answer."
# LLaVA's rule.json prompt for llava_bench_{conv,detail,complex} (one text for all three).
RULE = ("We would like to request your feedback on the performance of two AI assistants in response to the user "
        "question displayed above. The user asks the question on observing an image. For your reference, the visual "
        "content in the image is represented with a few sentences describing the image. \nPlease rate the "
        "helpfulness, relevance, accuracy, level of details of their responses. Each assistant receives an overall "
        "score on a scale of 1 to 10, where a higher score indicates better overall performance.\nPlease first "
        "output a single line containing only two values indicating the scores for Assistant 1 and 2, respectively. "
        "The two scores are separated by a space.\nIn the subsequent line, please provide a comprehensive "
        "explanation of your evaluation, avoiding any potential bias and ensuring that the order in which the "
        "responses were presented does not affect your judgment.")


def _jsonl(uri: str, what: str) -> list[dict]:
    try:
        text = storage.read_bytes(uri).decode("utf-8")
    except FileNotFoundError:
        raise ConfigError(f"{uri}: LLaVA-Bench {what} is missing") from None
    return [json.loads(line) for line in text.splitlines() if line.strip()]


def read_llava_bench(path: str, reference: str = "answers_gpt4.jsonl") -> list[dict]:
    """One row per question: question_id, category, question, image (URI), context (the
    image's caption) and reference (the reference answer's text)."""
    root = storage.normalize(path)
    questions = _jsonl(storage.join(root, "questions.jsonl"), "questions.jsonl")
    captions = {c["image"]: c["caption"] for c in _jsonl(storage.join(root, "context.jsonl"), "context.jsonl")}
    answers = {a["question_id"]: a["text"] for a in _jsonl(storage.join(root, reference), f"reference {reference}")}
    rows = []
    for q in questions:
        missing = [what for what, ok in (("a reference answer", q["question_id"] in answers),
                                         ("a context caption", q["image"] in captions)) if not ok]
        if missing or q.get("category") not in CATEGORIES:
            raise ConfigError(f"{root}: question {q['question_id']} lacks {missing or f'a category in {CATEGORIES}'}")
        caption = captions[q["image"]]
        rows.append({"question_id": q["question_id"], "category": q["category"], "question": q["text"],
                     "image": storage.join(root, "images", q["image"]), "reference": answers[q["question_id"]],
                     "context": "\n".join(caption) if isinstance(caption, list) else caption})
    return rows


def review_messages(row: dict, answer: str) -> list[dict]:
    """The judge's chat messages for one model answer, as eval_gpt_review_bench.py builds them."""
    content = (f"[Context]\n{row['context']}\n\n[Question]\n{row['question']}\n\n"
               f"[Assistant 1]\n{row['reference']}\n\n[End of Assistant 1]\n\n"
               f"[Assistant 2]\n{answer}\n\n[End of Assistant 2]\n\n[System]\n{RULE}\n\n")
    return [{"role": "system", "content": SYSTEM}, {"role": "user", "content": content}]


def parse_review(text: str | None) -> tuple[float, float] | None:
    """(reference score, model score) from the reply's first line, as LLaVA's
    `parse_score` reads it (commas as spaces, exactly two fields); None when it cannot."""
    if not text:
        return None
    fields = text.split("\n")[0].replace(",", " ").split(" ")
    if len(fields) != 2:
        return None
    try:
        return float(fields[0]), float(fields[1])
    except ValueError:
        return None


def llava_bench_scores(reviews: list[dict]) -> dict[str, float]:
    """{<category>.relative, .model, .reference, all.*, unparsed, failed} from rows with
    `category` and `review` (the judge's reply text; None when the call failed, counted
    apart so a judge that is down does not read as a judge that rambles)."""
    scored, unparsed, failed = defaultdict(list), 0, 0
    for r in reviews:
        pair = parse_review(r["review"])
        if pair is None:
            failed += r["review"] is None
            unparsed += r["review"] is not None
            continue
        scored[r["category"]].append(pair)
        scored["all"].append(pair)
    out: dict[str, float] = {"unparsed": float(unparsed), "failed": float(failed)}
    for category, pairs in sorted(scored.items()):
        reference, model = (sum(p[i] for p in pairs) / len(pairs) for i in (0, 1))
        out.update({f"{category}.reference": reference, f"{category}.model": model,
                    f"{category}.relative": 100 * model / reference if reference else float("nan")})
    return out


def judge(rows: list[dict], answers: dict, model: str, app_name: str = "vlit",
          max_tokens: int = 1024) -> list[str | None]:
    """Review each row's model answer (`answers`: question_id -> text) through the Serve
    app's chat with the reviewing model `model`, a generator of the app (e.g. a GPT-4-class
    openai backend): the app's judge deployments rate VLFeedback's aspects with their own
    rubric, not LLaVA's two-score review. LLaVA's settings: temperature 0.2, 1024 tokens.
    Returns each row's review text (None where the call failed)."""
    from vlit.serve.client import chat_texts, serve_calls

    requests = [{"model": model, "messages": review_messages(r, answers[r["question_id"]]), "temperature": 0.2,
                 "max_tokens": max_tokens} for r in rows]
    return [(chat_texts(result) or [None])[0] for result, _ in serve_calls(requests, method="chat", app_name=app_name)]


def set_digest(rows: list[dict]) -> str:
    """The questions, contexts and references read (images by URI): what a run was scored on."""
    return hashlib.sha256(json.dumps(rows, sort_keys=True).encode()).hexdigest()[:20]


def run_llava_bench(cfg: Config, model_uri: str | None) -> tuple[list[dict], str]:
    """The model's answers (greedy, through a Serve generator `candidate` over the export,
    the serving path's own prompt and image preprocessing) and the reviewer's review of
    each: prediction rows {key, category, question, answer, review} and the set's digest.
    The app runs beside the serve section's reviewer and is deleted after."""
    from ray import serve

    from vlit.config import GeneratorConfig, ServeConfig
    from vlit.runtime import init_ray
    from vlit.serve.app import start
    from vlit.serve.client import chat_texts, serve_calls, user_message

    bench = cfg.eval.llava_bench
    rows = read_llava_bench(bench.path, bench.reference)
    model = cfg.model if model_uri is None else cfg.model.model_copy(update={"preset": None, "path": model_uri})
    reviewer = cfg.serve.generators[bench.reviewer]
    app = ServeConfig(app_name=f"{cfg.serve.app_name}-llava-bench", http=cfg.serve.http,
                      images=cfg.serve.images.model_copy(update={"uri_roots": [
                          *cfg.serve.images.uri_roots, storage.join(storage.normalize(bench.path), "images")]}),
                      request_timeout_s=cfg.serve.request_timeout_s,
                      generators={"candidate": GeneratorConfig(backend={"kind": "hf", "model": model.model_dump()},
                                                               max_new_tokens=bench.max_new_tokens),
                                  bench.reviewer: reviewer})
    init_ray(cfg.ray, cfg.run.workdir)
    start(app)
    try:
        asked = [{"model": "candidate", "messages": [user_message(r["question"], r["image"])], "temperature": 0.0,
                  "max_tokens": bench.max_new_tokens} for r in rows]
        answers = {r["question_id"]: (chat_texts(result) or [""])[0]
                   for r, (result, _) in zip(rows, serve_calls(asked, method="chat", app_name=app.app_name))}
        reviews = judge(rows, answers, bench.reviewer, app.app_name, bench.review_tokens)
    finally:
        serve.delete(app.app_name)
    return [{"key": str(r["question_id"]), "category": r["category"], "question": r["question"],
             "answer": answers[r["question_id"]], "review": review} for r, review in zip(rows, reviews)], set_digest(rows)
