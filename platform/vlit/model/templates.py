"""Conversation templates: a conversation rendered to text, as pieces that say what each
span of that text is (system prompt, role tag, instruction, response), so label masks
follow from the rendering instead of being re-derived from token counts.

- `vicuna_v1` (LLaVA-1.5 fine-tuning, `conv_vicuna_v1`):
  "{system} USER: {q1} ASSISTANT: {a1}</s>USER: {q2} ASSISTANT: {a2}</s>", with the image
  placeholder moved to the start of its turn and followed by a newline, that turn's text
  stripped (LLaVA's `preprocess_multimodal`): wherever a row puts `<image>`, the model
  sees it where LLaVA-1.5 trained it. tests/model/test_llava_parity.py holds it (and the
  labels, and the tokens) to LLaVA's own preprocessing on the real sample rows.
- `plain` (LLaVA pretraining, projector alignment): "<image>{caption}\\n"; the
  instruction is dropped and the caption supervised.
- `chat_template`: the checkpoint's own chat template (`apply_chat_template`), images in
  the positions the row gives them. Its pieces come from rendering the conversation one
  message more at a time: what each message adds is its content (found verbatim) and the
  template's text around it; an assistant turn's end token(s) belong to the response.
  `model.template: null` (the default) takes the checkpoint's chat template when it has
  one (vicuna_v1 when it is vlit's own, else `chat_template`), and vicuna_v1 otherwise.
"""
from __future__ import annotations

from dataclasses import dataclass

from vlit.corpus.schema import IMAGE_TOKEN

SYSTEM, ROLE, INSTRUCTION, RESPONSE, IMAGE = "system", "role", "instruction", "response", "image"

# conv_vicuna_v1's system prompt (LLaVA-1.5); "a curious human ... the human's questions"
# is the older v0 wording.
VICUNA_SYSTEM = (
    "A chat between a curious user and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the user's questions."
)


class EncodeError(ValueError):
    """A row that cannot be trained on; `reason` is its quarantine reason."""

    def __init__(self, reason: str, detail: str):
        super().__init__(f"{reason}: {detail}")
        self.reason, self.detail = reason, detail


@dataclass(frozen=True)
class Piece:
    text: str
    kind: str  # SYSTEM | ROLE | INSTRUCTION | RESPONSE | IMAGE
    turn: int  # index of the message it renders: the unit of per-turn tokenization


def _check_turns(turns: list[tuple[str, str]]) -> None:
    roles = [role for role, _ in turns]
    expected = ["user", "assistant"] * (len(turns) // 2)
    if not turns or roles != expected:
        raise EncodeError("bad_turns", f"expected alternating user/assistant turns, got {roles}")


def image_first(content: str) -> str:
    """A turn holding the image placeholder as LLaVA trains it: the placeholder first, then
    a newline and the turn's text, stripped. Other turns are left as they are."""
    if IMAGE_TOKEN not in content:
        return content
    return (IMAGE_TOKEN + "\n" + content.replace(IMAGE_TOKEN, "").strip()).strip()


def render_vicuna_v1(turns: list[tuple[str, str]], eos: str) -> list[Piece]:
    _check_turns(turns)
    pieces = [Piece(VICUNA_SYSTEM, SYSTEM, 0)]
    for i, (role, content) in enumerate(turns):
        content = image_first(content)
        if role == "user":
            # The separator " " before a role tag belongs to the tag, as LLaVA renders it.
            pieces += [Piece(" USER: " if i == 0 else "USER: ", ROLE, i), Piece(content, INSTRUCTION, i)]
        else:
            pieces += [Piece(" ASSISTANT: ", ROLE, i), Piece(content, RESPONSE, i), Piece(eos, RESPONSE, i)]
    return pieces


def render_plain(turns: list[tuple[str, str]], eos: str) -> list[Piece]:
    _check_turns(turns)
    if len(turns) != 2:
        raise EncodeError("bad_turns", f"the plain template takes one image-caption pair, got {len(turns)} turns")
    image = [Piece(IMAGE_TOKEN, IMAGE, 0)] if IMAGE_TOKEN in turns[0][1] else []
    return image + [Piece(turns[1][1], RESPONSE, 1), Piece("\n", RESPONSE, 1)]


TEMPLATES = {"vicuna_v1": render_vicuna_v1, "plain": render_plain}
CHAT = "chat_template"


def _messages(turns: list[tuple[str, str]]) -> list[dict]:
    """Chat messages with content parts; an image part where the row has its placeholder."""
    out = []
    for role, content in turns:
        parts = []
        for k, text in enumerate(content.split(IMAGE_TOKEN)):
            if k:
                parts.append({"type": "image"})
            if text:
                parts.append({"type": "text", "text": text})
        out.append({"role": role, "content": parts})
    return out


def chat_template(processor) -> str | None:
    return getattr(processor, "chat_template", None) or getattr(processor.tokenizer, "chat_template", None)


def resolve(template: str | None, processor) -> str:
    """The template a model renders with: `model.template`, or (None) the checkpoint's
    chat template when it has one and vicuna_v1 when it has none."""
    if template is not None:
        if template == CHAT and chat_template(processor) is None:
            raise EncodeError("no_chat_template", "model.template is chat_template and the checkpoint has none")
        return template
    own = chat_template(processor)
    if own is None:
        return "vicuna_v1"
    return next((name for name, jinja in CHAT_TEMPLATES.items() if jinja == own), CHAT)


def _end_tokens(rest: str, tokenizer) -> str:
    """The special tokens `rest` starts with (an assistant turn's end: "</s>", "<|im_end|>")."""
    specials = sorted({*tokenizer.all_special_tokens, *tokenizer.get_added_vocab()}, key=len, reverse=True)
    end = ""
    while True:
        tok = next((t for t in specials if t and rest.startswith(t, len(end))), None)
        if tok is None:
            return end
        end += tok


def render_chat(turns: list[tuple[str, str]], processor) -> list[Piece]:
    """The pieces of a conversation under the checkpoint's chat template (module doc)."""
    _check_turns(turns)
    messages, pieces, done = _messages(turns), [], ""
    for i, (role, content) in enumerate(turns):
        full = processor.apply_chat_template(messages[:i + 1], tokenize=False)
        if not full.startswith(done):
            raise EncodeError("chat_template_not_incremental",
                              f"rendering message {i} changes the text of the messages before it")
        delta, at = full[len(done):], 0
        for text in [p["text"] for p in messages[i]["content"] if p["type"] == "text"]:
            found = delta.find(text, at)
            if found < 0:
                raise EncodeError("chat_template_rewrites_content",
                                  f"message {i}'s text {text[:40]!r} is not in what the template renders for it")
            if found > at:
                pieces.append(Piece(delta[at:found], ROLE, i))
            pieces.append(Piece(text, INSTRUCTION if role == "user" else RESPONSE, i))
            at = found + len(text)
        rest = delta[at:]
        end = _end_tokens(rest, processor.tokenizer) if role == "assistant" else ""
        pieces += [Piece(t, k, i) for t, k in ((end, RESPONSE), (rest[len(end):], ROLE)) if t]
        done = full
    return pieces

# The same conversation format as a Hugging Face chat template, saved with exports so
# other tools (vLLM through Ray Serve LLM, `apply_chat_template`) format prompts exactly as
# the model was trained. An image part renders as the placeholder and a newline before
# the turn's text, LLaVA's convention; the generation prompt ends with "ASSISTANT:".
# tests/model/test_templates.py holds it to `render_vicuna_v1`.
CHAT_TEMPLATES = {
    "vicuna_v1": (
        "{%- set system = '" + VICUNA_SYSTEM.replace("'", "\\'") + "' -%}"
        "{%- if messages[0]['role'] == 'system' -%}{%- set system = messages[0]['content'] -%}"
        "{%- set messages = messages[1:] -%}{%- endif -%}"
        "{{- system -}}"
        "{%- for message in messages -%}"
        "{%- if message['content'] is string -%}{%- set text = message['content'] -%}{%- set images = 0 -%}"
        "{%- else -%}{%- set text = message['content'] | selectattr('type', 'equalto', 'text')"
        " | map(attribute='text') | join('\\n') -%}"
        "{%- set images = message['content'] | rejectattr('type', 'equalto', 'text') | list | length -%}{%- endif -%}"
        "{%- if message['role'] == 'user' -%}"
        "{{- ' USER: ' if loop.first else 'USER: ' -}}"
        "{%- if images -%}{{- '" + IMAGE_TOKEN + "\\n' * images + text | trim -}}{%- else -%}{{- text -}}{%- endif -%}"
        "{%- else -%}{{- ' ASSISTANT: ' + text + eos_token -}}{%- endif -%}"
        "{%- endfor -%}"
        "{%- if add_generation_prompt -%}{{- ' ASSISTANT:' -}}{%- endif -%}"
    ),
}


def render(turns: list[tuple[str, str]], template: str, eos: str, processor=None) -> list[Piece]:
    """The pieces of a conversation of (role, content) turns under `template` (a name
    `resolve` gives; `chat_template` needs the processor)."""
    if template == CHAT:
        return render_chat(turns, processor)
    return TEMPLATES[template](turns, eos)
