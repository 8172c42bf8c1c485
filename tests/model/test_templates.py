"""The chat template saved with exports renders conversations exactly as the template the
model trained with (model/templates.py), so a tool that formats prompts from the export
(vLLM through Ray Serve LLM, `apply_chat_template`) sees the training format."""
from __future__ import annotations

from vlit.config import ModelConfig
from vlit.corpus.schema import IMAGE_TOKEN
from vlit.model.build import build_model_and_processor, export_model, load_exported
from vlit.model.templates import CHAT_TEMPLATES, render


def _chat(turns):
    out = []
    for i, (role, text) in enumerate(turns):
        if role == "user" and i == 0:
            out.append({"role": role, "content": [{"type": "image"}, {"type": "text", "text": text}]})
        else:
            out.append({"role": role, "content": text})
    return out


def test_vicuna_v1_chat_template_is_the_training_render(tmp_path):
    model, processor = build_model_and_processor(ModelConfig(preset="tiny"))
    export_model(model, processor, str(tmp_path / "export"), template="vicuna_v1")
    _, reloaded = load_exported(str(tmp_path / "export"))
    tokenizer = reloaded.tokenizer
    assert reloaded.chat_template == tokenizer.chat_template == CHAT_TEMPLATES["vicuna_v1"]
    turns = [("user", "What colour is the circle?"), ("assistant", "Red."),
             ("user", "And the one's on the left?"), ("assistant", "It is blue.")]
    expected = "".join(p.text for p in render([("user", f"{IMAGE_TOKEN}\n{turns[0][1]}"), *turns[1:]], "vicuna_v1",
                                                  tokenizer.eos_token))
    assert tokenizer.apply_chat_template(_chat(turns), tokenize=False) == expected
    # The generation prompt is the training text up to the assistant's role tag.
    prompt = tokenizer.apply_chat_template(_chat(turns[:1]), tokenize=False, add_generation_prompt=True)
    assert expected.startswith(prompt) and prompt.endswith(" ASSISTANT:")
