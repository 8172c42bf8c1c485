"""Question families of the synthetic world: what can be asked of a scene, in which
phrasings and answer formats, with the true answer.

A family (colour, counting, existence, multiple choice, ...) turns a scene into facts:
slot values for one question, the true answer included. Facts of one family share their
slots, so any phrasing and answer format of the family can be filled from any of its
facts; a fact's `alternatives` are the same question's fact for every answer it could
have, so an evaluation can score each candidate answer in the task's own format.
The instruction wording (intros, format hints, layouts) is here too: the corpus, the
evaluation sets and the tiny tokenizer all speak it.
"""
from __future__ import annotations

import random
import re
from dataclasses import dataclass
from typing import Callable

from vlit.world.scenes import PALETTE, POSITIONS, SHAPES, WHERE, WORDS, Scene

NUMBER_WORDS = ("zero", "one", "two", "three", "four")

# Instruction templates: an intro, a hint matching the answer format, and a layout.
# Intros name no colour, shape kind or position, so the question alone says what is asked.
# Expert-style task definitions, as long as Vision-Flan's (its rows average ~610 bytes,
# its instructions ~260 characters), so a full-size synthetic release is about 1 GB.
INTROS = (
    "You are given a synthetic image made of simple flat figures drawn on a plain background. "
    "Look at the whole image carefully before you answer, and answer the question that follows.",
    "The picture below is a small drawing of geometric figures in solid colours. Each figure sits "
    "in its own part of the canvas. Read the question and answer it using only what is visible.",
    "In this task you will see an image of coloured figures and a question about them. Base your "
    "answer strictly on the image; do not guess beyond what can be seen in the drawing.",
    "Examine the image carefully. It contains one or more simple figures, and possibly a short word "
    "written in black letters. Then respond to the query below as precisely as you can.",
    "Here is a drawing of coloured figures arranged on a three-by-three grid. Inspect where each "
    "figure is, what shape and colour it has and how large it is, and answer the question.",
    "Study the drawing and respond to the query. The image was generated from a known scene "
    "description, so every question has exactly one correct answer that the image supports.",
    "Based on the image, answer the following. Pay attention to the colours, the kinds of figures, "
    "their sizes and their positions, since the question may ask about any of these properties.",
    "Inspect the scene and reply. You will be shown a simple synthetic picture; identify the "
    "relevant figure or text in it first, and then give the answer in the requested format.",
)
HINTS = {
    "word": ("Answer with one word.", "Reply with a single word."),
    "digits": ("Answer with a number in digits.", "Reply with the number only."),
    "phrase": ("Answer with a short phrase.", "Give a brief answer."),
    "sentence": ("Answer in a complete sentence.", "Respond with one full sentence."),
    "yesno": ("Answer yes or no.", "Reply with yes or no."),
    "text": ("Answer with the exact text.", "Copy the text exactly."),
    "choice": ("Answer with the option letter and its text.", "Choose the correct option."),
}
LAYOUTS = ("{intro}\n{input_text}\n{hint}", "{input_text}\n{intro} {hint}")
CHOICE_LAYOUTS = (
    "{intro}\n{input_text}\n\nOptions: {options}\n{hint}",
    "{input_text}\n\nOptions: {options}\n{intro} {hint}",
)


Fact = dict[str, str]


def _pick_options(correct: str, pool: tuple[str, ...], n: int, rng: random.Random) -> Fact:
    """Multiple-choice slots, written like the release: `(a) x (b) y`, answered `(b) y`."""
    options = [correct, *rng.sample([p for p in pool if p != correct], n - 1)]
    rng.shuffle(options)
    letters = "abcdefgh"
    letter = letters[options.index(correct)]
    return {
        "options": " ".join(f"({letters[i]}) {o}" for i, o in enumerate(options)),
        "answer": f"({letter}) {correct}",
    }


def _count_slots(n: int, singular: str, plural: str) -> Fact:
    things = f"no {plural}" if n == 0 else f"{NUMBER_WORDS[n]} {singular if n == 1 else plural}"
    # The unit words stay in the fact, so `_other_counts` can phrase any other count.
    return {"n": str(n), "n_word": NUMBER_WORDS[n], "n_things": things, "unit": singular, "units": plural}


def _color_facts(scene: Scene, rng: random.Random) -> list[Fact]:
    return [
        {"where": WHERE[s.position], "color": s.color, "Color": s.color.capitalize()}
        for s in scene.shapes
    ]


def _shape_facts(scene: Scene, rng: random.Random) -> list[Fact]:
    return [
        {"where": WHERE[s.position], "kind": s.kind, "Kind": s.kind.capitalize()}
        for s in scene.shapes
    ]


def _object_count_facts(scene: Scene, rng: random.Random) -> list[Fact]:
    return [{"what": "shapes", **_count_slots(len(scene.shapes), "shape", "shapes")}]


def _kind_count_facts(scene: Scene, rng: random.Random) -> list[Fact]:
    return [{"what": f"{kind}s", **_count_slots(scene.count(kind=kind), kind, f"{kind}s")} for kind in SHAPES]


def _color_count_facts(scene: Scene, rng: random.Random) -> list[Fact]:
    present = sorted({s.color for s in scene.shapes}, key=list(PALETTE).index)
    absent = [c for c in PALETTE if c not in present]
    # Mostly colours that are there, and one that is not: "zero" must be learnable too.
    colors = present + rng.sample(absent, 1)
    return [
        {"color": c, **_count_slots(scene.count(color=c), f"{c} shape", f"{c} shapes")}
        for c in colors
    ]


def _localization_facts(scene: Scene, rng: random.Random) -> list[Fact]:
    return [
        {"object": s.name, "position": s.position, "where": WHERE[s.position]}
        for s in scene.shapes
    ]


def _size_comparison_facts(scene: Scene, rng: random.Random) -> list[Fact]:
    facts = []
    for i, a in enumerate(scene.shapes):
        for b in scene.shapes[i + 1:]:
            if a.size == b.size:
                continue
            larger, smaller = (a, b) if a.size == "large" else (b, a)
            first, second = (a, b) if rng.random() < 0.5 else (b, a)
            facts.append({"a": first.name, "b": second.name,
                          "larger": larger.name, "smaller": smaller.name})
    return facts


def _text_facts(scene: Scene, rng: random.Random) -> list[Fact]:
    if scene.text is None:
        return []
    return [{"text": scene.text, "where": WHERE[scene.text_position]}]


def _existence_facts(scene: Scene, rng: random.Random) -> list[Fact]:
    present = {(s.kind, s.color) for s in scene.shapes}
    # Near misses (right colour, wrong kind or the reverse) make "no" a real question.
    near = sorted({(k, c) for k in SHAPES for c in PALETTE
                   if (k, c) not in present
                   and any(k == pk or c == pc for pk, pc in present)})
    absent = rng.sample(near, min(len(present), len(near)))
    return [_existence_slots(s.name, True) for s in scene.shapes] + [
        _existence_slots(f"{c} {k}", False) for k, c in absent
    ]


def _existence_slots(obj: str, yes: bool) -> Fact:
    sentence = f"Yes, there is a {obj}." if yes else f"No, there is no {obj}."
    return {"object": obj, "yes": "yes" if yes else "no", "Yes": "Yes" if yes else "No", "yes_sentence": sentence}


def _color_choice_facts(scene: Scene, rng: random.Random) -> list[Fact]:
    return [
        {"where": WHERE[s.position], **_pick_options(s.color, tuple(PALETTE), rng.choice((3, 4)), rng)}
        for s in scene.shapes
    ]


def _shape_choice_facts(scene: Scene, rng: random.Random) -> list[Fact]:
    return [
        {"where": WHERE[s.position], "color": s.color, **_pick_options(s.kind, SHAPES, 3, rng)}
        for s in scene.shapes
    ]


# A fact's alternatives: the same question's fact for every answer it could have (the
# true one included), so an evaluation can score each candidate answer in the task's own
# answer format ("The image contains two shapes." against "... three shapes.").
def _other_colors(f: Fact) -> list[Fact]:
    return [{**f, "color": c, "Color": c.capitalize()} for c in PALETTE]


def _other_kinds(f: Fact) -> list[Fact]:
    return [{**f, "kind": k, "Kind": k.capitalize()} for k in SHAPES]


def _other_counts(f: Fact) -> list[Fact]:
    return [{**f, **_count_slots(n, f["unit"], f["units"])} for n in range(len(NUMBER_WORDS))]


def _other_positions(f: Fact) -> list[Fact]:
    return [{**f, "position": p, "where": WHERE[p]} for p in POSITIONS]


def _other_sizes(f: Fact) -> list[Fact]:
    return [f, {**f, "larger": f["smaller"], "smaller": f["larger"]}]


def _other_texts(f: Fact) -> list[Fact]:
    return [{**f, "text": w} for w in WORDS]


def _other_existence(f: Fact) -> list[Fact]:
    return [{**f, **_existence_slots(f["object"], yes)} for yes in (True, False)]


def _other_options(f: Fact) -> list[Fact]:
    # The options slot is "(a) x (b) y ...": each option is a candidate answer.
    return [{**f, "answer": f"({letter}) {text}"}
            for letter, text in re.findall(r"\(([a-h])\) (.+?)(?= \([a-h]\) |$)", f["options"])]


@dataclass(frozen=True)
class Family:
    name: str
    dataset: str
    facts: Callable[[Scene, random.Random], list[Fact]]
    questions: tuple[str, ...]
    answers: tuple[tuple[str, str], ...]  # (answer format, hint kind)
    alternatives: Callable[[Fact], list[Fact]]

    @property
    def choice(self) -> bool:
        return self.answers[0][1] == "choice"


FAMILIES = (
    Family("color_identification", "synth-shapes", _color_facts,
           ("What colour is the shape {where}?",
            "Which colour does the figure {where} have?",
            "Name the colour of the object {where}."),
           (("{color}", "word"), ("{Color}", "word"), ("The shape {where} is {color}.", "sentence")), _other_colors),
    Family("shape_identification", "synth-shapes", _shape_facts,
           ("What shape is {where}?",
            "Which kind of shape is drawn {where}?",
            "Identify the shape {where}."),
           (("{kind}", "word"), ("{Kind}", "word"), ("The shape {where} is a {kind}.", "sentence")), _other_kinds),
    Family("object_counting", "synth-count", _object_count_facts,
           ("How many {what} are there in the image?",
            "Count the {what} in the picture.",
            "What is the number of {what} shown?"),
           (("{n}", "digits"), ("{n_word}", "word"), ("The image contains {n_things}.", "sentence")), _other_counts),
    Family("kind_counting", "synth-count", _kind_count_facts,
           ("How many {what} are there in the image?",
            "Count the {what} in the picture.",
            "What is the number of {what} shown?"),
           (("{n}", "digits"), ("{n_word}", "word"), ("The image contains {n_things}.", "sentence")), _other_counts),
    Family("color_counting", "synth-count", _color_count_facts,
           ("How many {color} shapes are there?",
            "Count the {color} objects in the image.",
            "What is the number of {color} figures in the picture?"),
           (("{n}", "digits"), ("{n_word}", "word"), ("The image contains {n_things}.", "sentence")), _other_counts),
    Family("object_localization", "synth-shapes", _localization_facts,
           ("Where is the {object}?",
            "In which part of the image is the {object}?",
            "Locate the {object}."),
           (("{position}", "word"), ("{where}", "phrase"), ("The {object} is {where}.", "sentence")), _other_positions),
    Family("size_comparison", "synth-shapes", _size_comparison_facts,
           ("Which is larger, the {a} or the {b}?",
            "Which one is bigger: the {a} or the {b}?",
            "Between the {a} and the {b}, which is larger?"),
           (("the {larger}", "phrase"), ("{larger}", "phrase"),
            ("The {larger} is larger than the {smaller}.", "sentence")), _other_sizes),
    Family("text_recognition", "synth-ocr", _text_facts,
           ("What word is written in the image?",
            "Read the text shown in the picture.",
            "What does the text {where} say?"),
           (("{text}", "text"), ('The text says "{text}".', "sentence")), _other_texts),
    Family("object_existence", "synth-shapes", _existence_facts,
           ("Is there a {object} in the image?",
            "Does the picture contain a {object}?",
            "Can you see a {object}?"),
           (("{yes}", "yesno"), ("{Yes}", "yesno"), ("{yes_sentence}", "sentence")), _other_existence),
    Family("color_choice", "synth-choice", _color_choice_facts,
           ("What colour is the shape {where}?",
            "Which colour is the figure {where}?",
            "Select the colour of the object {where}."),
           (("{answer}", "choice"),), _other_options),
    Family("shape_choice", "synth-choice", _shape_choice_facts,
           ("Which shape is {where}?",
            "What kind of {color} figure is {where}?",
            "Select the shape of the {color} object {where}."),
           (("{answer}", "choice"),), _other_options),
)
FAMILY_BY_NAME = {f.name: f for f in FAMILIES}


def check_family_weights(weights: dict[str, float]) -> dict[str, float]:
    for name, weight in weights.items():
        if name not in FAMILY_BY_NAME:
            raise ValueError(f"family_weights: unknown question family {name!r}; expected one of {sorted(FAMILY_BY_NAME)}")
        if not weight > 0:
            raise ValueError(f"family_weights: {name} must be > 0, got {weight}")
    return dict(weights)


def family_of(task_name: str) -> Family:
    """The question family of a task, from its name (`dataset+family_variant`)."""
    return FAMILY_BY_NAME[task_name.split("+", 1)[1].rsplit("_", 1)[0]]
