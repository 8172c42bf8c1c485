"""Self-instruct from annotations (the VLIT review, section 4.2).

Annotations of an image (captions, objects with counts and attributes, OCR text, QA pairs)
become a textual description through templates (`describe`). The generator gets a system
prompt with the review's constraints, `examples` in-context examples drawn at random from
a pool of ten, and the description; it writes a multi-round dialogue as JSON objects
`{"User": ..., "AI": ...}` (`parse_dialogue`, strict). Replies that do not parse, or that
talk about the description instead of the image, are quarantined with their reason.

The annotation source here is the synthetic corpus, whose scenes are ground truth
(`vlit.world.scene_for`).
"""
from __future__ import annotations

import json
import random
import re

from vlit import storage
from vlit.config import SelfInstructConfig
from vlit.serve.client import chat_texts, serve_calls
from vlit.versions import publish_rows, quarantine_row
from vlit.world import WHERE, scene_for

SYSTEM_PROMPT = (
    "You are an AI visual assistant looking at a single image. You are given what is in the image. "
    "Write a multi-round conversation between a person asking about the image and you answering. Rules:\n"
    "- Answer confidently, as someone who sees the image; do not hedge.\n"
    "- Talk about the image, never about the text you were given: never write 'the description says' "
    "or 'according to the description'.\n"
    "- Include at least one question about an object that is absent from the image, answered negatively.\n"
    "- Ask about colours, counts, positions and any written text.\n"
    "- Reply with a JSON list of objects {\"User\": question, \"AI\": answer}, nothing else."
)
EXAMPLES = [
    ("Objects: 1 red circle (large, on the left).", [
        {"User": "What shape is on the left?", "AI": "A large red circle."},
        {"User": "Is there a blue square?", "AI": "No, there is no blue square."}]),
    ("Objects: 2 shapes: a green square (small, at the top), a blue triangle (large, in the center).", [
        {"User": "How many shapes are there?", "AI": "There are two shapes."},
        {"User": "Which one is larger?", "AI": "The blue triangle is larger than the green square."}]),
    ("Objects: 1 yellow triangle (small, at the bottom). Text: \"SUN\" at the top.", [
        {"User": "What word is written in the image?", "AI": "The word SUN is written at the top."},
        {"User": "Is there a circle?", "AI": "No, there is no circle."}]),
    ("Objects: 3 shapes: a purple circle, an orange square, a red triangle.", [
        {"User": "Is there anything orange?", "AI": "Yes, an orange square."},
        {"User": "Is there a dog?", "AI": "No, there is no dog; there are only shapes."}]),
    ("Objects: 1 blue square (large, on the right).", [
        {"User": "Where is the square?", "AI": "The blue square is on the right."},
        {"User": "Are there any green shapes?", "AI": "No, nothing in the image is green."}]),
    ("Objects: 2 circles: red (left), yellow (right).", [
        {"User": "How many circles are there?", "AI": "Two circles, a red one and a yellow one."},
        {"User": "Is there a triangle?", "AI": "No, there is no triangle."}]),
    ("Objects: 1 green triangle (large, in the center). Text: \"OK\" at the bottom.", [
        {"User": "What is in the middle?", "AI": "A large green triangle."},
        {"User": "What does the text say?", "AI": "It says OK."}]),
    ("Objects: 4 shapes: a red square, a blue circle, a green circle, a yellow triangle.", [
        {"User": "How many circles are there?", "AI": "There are two circles, a blue one and a green one."},
        {"User": "Is there a purple shape?", "AI": "No, there is no purple shape."}]),
    ("Objects: 1 orange circle (small, at the top).", [
        {"User": "What colour is the circle?", "AI": "The circle is orange."},
        {"User": "Is the circle large?", "AI": "No, it is small."}]),
    ("Objects: 2 shapes: a purple square (left), a purple triangle (right).", [
        {"User": "What colour are the shapes?", "AI": "Both shapes are purple."},
        {"User": "Is there a red circle?", "AI": "No, there is no red circle."}]),
]
MENTIONS_TEXT = re.compile(r"\b(the|this) (description|caption|annotation|text provided)\b( says| states| mentions)?",
                           re.I)


class DialogueError(ValueError):
    def __init__(self, reason: str, detail: str):
        super().__init__(detail)
        self.reason, self.detail = reason, detail


def parse_dialogue(text: str) -> list[dict]:
    """The rounds of a reply: a JSON list of {"User": str, "AI": str} (or one such object
    per line); DialogueError(reason, detail) otherwise."""
    text = (text or "").strip()
    if not text:
        raise DialogueError("empty_reply", "the reply is empty")
    try:
        value = json.loads(text)
    except ValueError:
        try:
            value = [json.loads(line) for line in text.splitlines() if line.strip()]
        except ValueError as e:
            raise DialogueError("not_json", f"neither a JSON list nor JSON lines: {e}") from None
    value = [value] if isinstance(value, dict) else value
    if not isinstance(value, list) or not value:
        raise DialogueError("not_dialogue", "expected a non-empty list of {\"User\", \"AI\"} objects")
    for i, turn in enumerate(value):
        if not isinstance(turn, dict) or set(turn) != {"User", "AI"}:
            raise DialogueError("not_dialogue", f"round {i}: expected exactly the keys User and AI")
        if not all(isinstance(turn[k], str) and turn[k].strip() for k in ("User", "AI")):
            raise DialogueError("not_dialogue", f"round {i}: User and AI must be non-empty strings")
        if MENTIONS_TEXT.search(turn["AI"]):
            raise DialogueError("mentions_description", f"round {i}: talks about the description, not the image")
    return [{"User": t["User"].strip(), "AI": t["AI"].strip()} for t in value]


def synth_annotations(corpus_dir: str, seed: int, n: int) -> list[dict]:
    """Annotations of the first `n` pool images of a synthetic corpus folder (ground truth)."""
    out = []
    for i in range(n):
        scene = scene_for(seed, i)
        objects: dict[str, dict] = {}
        for s in scene.shapes:
            o = objects.setdefault(s.name, {"name": s.name, "count": 0, "attributes": []})
            o["count"] += 1
            o["attributes"].append(f"{s.size}, {WHERE[s.position]}")
        out.append({"id": f"img_{i:05d}", "image": storage.join(corpus_dir, "images", f"img_{i:05d}.png"),
                    "captions": [f"An image of {len(scene.shapes)} shape{'s' * (len(scene.shapes) > 1)}."],
                    "objects": list(objects.values()),
                    "ocr": [{"text": scene.text, "where": WHERE[scene.text_position]}] if scene.text else [],
                    "qa": []})
    return out


def describe(ann: dict) -> str:
    """The templates: annotations -> a textual description of the image."""
    lines = [f"Caption: {c}" for c in ann.get("captions", [])]
    objs = ann.get("objects", [])
    if objs:
        parts = [f"{o['count']} {o['name']} ({'; '.join(o.get('attributes', []))})" for o in objs]
        lines.append(f"Objects ({sum(o['count'] for o in objs)} in all): " + ", ".join(parts) + ".")
    for t in ann.get("ocr", []):
        lines.append(f"Text: \"{t['text']}\" {t.get('where', '')}".rstrip() + ".")
    for qa in ann.get("qa", []):
        lines.append(f"Q: {qa['question']} A: {qa['answer']}")
    return "\n".join(lines)


def request(ann: dict, cfg: SelfInstructConfig, index: int) -> dict:
    rng = random.Random(f"{cfg.seed}:{ann['id']}")
    messages = [{"role": "system", "content": SYSTEM_PROMPT}]
    for desc, dialogue in rng.sample(EXAMPLES, cfg.examples):
        messages += [{"role": "user", "content": desc}, {"role": "assistant", "content": json.dumps(dialogue)}]
    messages.append({"role": "user", "content": describe(ann)})
    return {"model": cfg.generator, "messages": messages, "n": cfg.samples, "temperature": cfg.temperature,
            "max_tokens": cfg.max_tokens, "seed": cfg.seed * 100003 + index}


def self_instruct(annotations: list[dict], cfg: SelfInstructConfig, out_root: str, app_name: str = "vlit",
                  rejected: list[dict] | None = None) -> dict:
    """Dialogues for each annotated image -> a versioned dataset under OUT_ROOT; rows in
    the Vision-Flan release shape plus provenance. `rejected`: annotations that could not
    be read, kept in the version's quarantine."""
    reqs = [request(a, cfg, i) for i, a in enumerate(annotations)]
    rows, quarantine = [], list(rejected or [])
    for ann, (result, error) in zip(annotations, serve_calls(reqs, method="chat", app_name=app_name)):
        if error:
            quarantine.append(quarantine_row("generation_failed", error, ann["id"], None))
        for k, text in enumerate(chat_texts(result)):
            try:
                rounds = parse_dialogue(text)
            except DialogueError as e:
                quarantine.append(quarantine_row(e.reason, e.detail, f"{ann['id']}#{k}", text))
                continue
            conv = []
            for j, r in enumerate(rounds):
                conv += [{"from": "human", "value": ("<image>\n" if j == 0 else "") + r["User"]},
                         {"from": "gpt", "value": r["AI"]}]
            rows.append({"id": f"{ann['id']}-si-{k}", "image": ann["image"], "task_name": "self_instruct",
                         "conversations": conv, "source_id": ann["id"], "generator": cfg.generator, "sample": k})
    rows.sort(key=lambda r: r["id"])
    return publish_rows(out_root, "self-instruct", rows, quarantine, cfg.model_dump(mode="json"))
