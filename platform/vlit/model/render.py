"""What the model trains on, row by row (`vlit corpus render`): each row's rendered text,
token ids, which of them are supervised, and how many tokens its image takes."""
from __future__ import annotations

from vlit.config import Config
from vlit.model.labels import IGNORE


def encode_rows(cfg: Config, version_uri: str, rows: int) -> tuple[object, list[dict]]:
    """(processor, the first `rows` rows of the version as training encodes them): per row
    {id, key, task, template, text, input_ids, labels, image_tokens}, or {id, key, error}
    for a row training would quarantine."""
    from vlit.corpus.images import decode_image, read_image_bytes
    from vlit.model.build import build_processor
    from vlit.model.families import pixels
    from vlit.model.labels import encode_row
    from vlit.model.templates import EncodeError, resolve
    from vlit.versions import CorpusVersion

    version = CorpusVersion.open(version_uri)
    processor = build_processor(cfg.model)
    templates = None
    if cfg.loss.target == "l2t":
        from vlit.corpus.template_text import template_text
        from vlit.runtime import init_ray

        init_ray(cfg.ray, cfg.run.workdir)
        templates = template_text(version, cfg.loss)
    template = resolve(cfg.model.template, processor)
    out = []
    for row in version.read_table(columns=["id", "key", "task", "turns", "image"]).slice(0, rows).to_pylist():
        tokens = pixels(processor, [decode_image(read_image_bytes(row["image"]))]).tokens if row["image"] else None
        try:
            enc = encode_row(row, processor, cfg.model, cfg.loss, templates, tokens)
        except EncodeError as e:
            out.append({"id": row["id"], "key": row["key"], "error": f"{e.reason}: {e.detail}"})
            continue
        out.append({"id": row["id"], "key": row["key"], "task": row["task"], "template": template, "text": enc.text,
                    "input_ids": enc.input_ids.tolist(), "labels": enc.labels.tolist(),
                    "image_tokens": int(sum(tokens or [0]))})
    return processor, out


def report(rows: list[dict], decode) -> str:
    """The rows as text: the rendered text, the supervised spans decoded, ids and labels."""
    lines = []
    for r in rows:
        if "error" in r:
            lines.append(f"== row {r['id']} (key {r['key']}): not trained on: {r['error']}\n")
            continue
        ids, labels = r["input_ids"], r["labels"]
        on = [i for i, label in enumerate(labels) if label != IGNORE]
        runs, start = [], None
        for a, b in zip(on, on[1:] + [None]):
            start = a if start is None else start
            if b != a + 1:
                runs.append(decode(ids[start:a + 1]))
                start = None
        lines += [f"== row {r['id']} (task {r['task']}, template {r['template']}): {len(ids)} tokens, "
                  f"{r['image_tokens']} image tokens, {len(on)} supervised",
                  f"text:        {r['text']!r}",
                  "supervised:  " + " | ".join(repr(x) for x in runs),
                  f"input_ids:   {ids}",
                  f"labels:      {labels}\n"]
    return "\n".join(lines) + "\n"
