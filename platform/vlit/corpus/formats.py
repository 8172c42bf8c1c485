"""Source formats → the canonical schema, vectorized over Arrow tables.

Each format has an explicit Arrow schema for pyarrow's JSON reader (fast path). A chunk
the reader rejects (a wrong type somewhere in it) is parsed row by row with `coerce`,
which turns each bad row into a quarantine reason and the rest into the same explicit
schema; both paths then share one vectorized `normalize`.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from vlit import storage
from vlit.corpus.schema import IMAGE_TOKEN, TURN

_CONVERSATION = pa.list_(pa.struct([("from", pa.string()), ("value", pa.string())]))

SOURCE_SCHEMAS: dict[str, pa.Schema] = {
    # Vision-Flan release format (what LLaVA-style trainers read).
    "vision-flan": pa.schema(
        [("id", pa.string()), ("image", pa.string()), ("task_name", pa.string()), ("conversations", _CONVERSATION)]
    ),
    # Vision-Flan raw metadata format.
    "vision-flan-raw": pa.schema(
        [
            ("instance_id", pa.string()),
            ("img_path", pa.string()),
            ("options", pa.list_(pa.string())),
            ("input_text", pa.string()),
            ("instruction", pa.string()),
            ("output", pa.string()),
            ("dataset_name", pa.string()),
            ("task_name", pa.string()),
        ]
    ),
    # LLaVA-Instruct: multi-turn; text-only rows have no `image`.
    "llava": pa.schema([("id", pa.string()), ("image", pa.string()), ("conversations", _CONVERSATION)]),
}

# Source role names → canonical roles.
_ROLES_FROM = pa.array(["human", "user", "gpt", "assistant", "system"])
_ROLES_TO = pa.array(["user", "user", "assistant", "assistant", "system"])
# Fields whose numbers are ids in some releases: accepted and written as strings.
_ID_FIELDS = {"id", "instance_id"}


@dataclass
class Normalized:
    table: pa.Table  # canonical columns, every row (rejected ones too, for alignment)
    image_ref: pa.Array  # the image reference as written in the source (for row keys)
    reason: np.ndarray  # object array: None (kept) or a quarantine reason
    detail: np.ndarray  # object array: None or text


def coerce(obj, schema: pa.Schema) -> tuple[dict | None, str | None]:
    """One parsed JSON value → a row of `schema`, or (None, why it can't be)."""
    if not isinstance(obj, dict):
        return None, f"element is a JSON {type(obj).__name__}, not an object"
    row = {}
    for field in schema:
        value = obj.get(field.name)
        if value is None:
            row[field.name] = None
        elif pa.types.is_string(field.type):
            if isinstance(value, str):
                row[field.name] = value
            elif field.name in _ID_FIELDS and isinstance(value, int) and not isinstance(value, bool):
                row[field.name] = str(value)
            else:
                return None, f"field {field.name!r}: expected a string, got {type(value).__name__}"
        elif field.type == _CONVERSATION:
            if not isinstance(value, list) or not all(
                isinstance(t, dict)
                and isinstance(t.get("from"), (str, type(None)))
                and isinstance(t.get("value"), (str, type(None)))
                for t in value
            ):
                return None, f"field {field.name!r}: expected a list of {{from, value}} strings"
            row[field.name] = [{"from": t.get("from"), "value": t.get("value")} for t in value]
        else:  # list<string> (options)
            if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
                return None, f"field {field.name!r}: expected a list of strings"
            row[field.name] = value
    return row, None


def _per_row(flags: np.ndarray, parents: np.ndarray, n: int) -> np.ndarray:
    """Any-over-turns: True for rows with at least one flagged turn."""
    return np.bincount(parents[flags], minlength=n) > 0


def _np_bool(arr) -> np.ndarray:
    return np.asarray(arr.fill_null(False).to_numpy(zero_copy_only=False), dtype=bool)


def _has_text(values: pa.Array) -> pa.Array:
    """Non-empty and not only whitespace (without making trimmed copies of the text)."""
    return pc.and_(pc.greater(pc.binary_length(values), 0), pc.invert(pc.utf8_is_space(values)))


# A `..` segment, also percent-encoded (`%2e%2e`, `..%2f`, doubly encoded `%252e`): our
# clients read those as literal names, but a store or gateway that decodes paths would not.
_SEP = r"(?:[/\\]|%(?:25)*(?:2f|5c))"
_DOT = r"(?:\.|%(?:25)*2e)"
_DOT_DOT = rf"(?i)(?:^|{_SEP}){_DOT}{_DOT}(?:{_SEP}|$)"


def _escapes(ref: pa.Array) -> np.ndarray:
    """Image references that would leave the image root: absolute, `..`, or a scheme."""
    bad = pc.or_(
        pc.match_substring_regex(ref, r"^[/\\]|^[A-Za-z]:|://"),
        pc.match_substring_regex(ref, _DOT_DOT),
    )
    return _np_bool(bad)


def _turns_from_conversations(conv: pa.Array, n: int):
    lengths = pc.list_value_length(conv).fill_null(0).to_numpy(zero_copy_only=False).astype(np.int32)
    flat = pc.list_flatten(conv)
    parents = pc.list_parent_indices(conv).to_numpy(zero_copy_only=False)
    frm, value = flat.field("from"), flat.field("value")
    role = pc.take(_ROLES_TO, pc.index_in(frm, value_set=_ROLES_FROM))
    offsets = pa.array(np.concatenate(([0], np.cumsum(lengths))).astype(np.int32))
    turns = pa.ListArray.from_arrays(offsets, pa.StructArray.from_arrays([role, value], fields=list(TURN)))
    bad_turn = _per_row(_np_bool(pc.or_(pc.is_null(role), pc.is_null(value))), parents, n)
    is_user = _np_bool(pc.equal(role, "user"))
    is_asst = _np_bool(pc.equal(role, "assistant"))
    nonempty = _np_bool(_has_text(value))
    has_reply = _per_row(is_asst & nonempty, parents, n)
    has_token = _per_row(is_user & _np_bool(pc.match_substring(value, IMAGE_TOKEN)), parents, n)
    return turns, lengths, bad_turn, has_reply, has_token


def _turns_from_raw(instruction: pa.Array, output: pa.Array, has_image: np.ndarray, n: int):
    prefix = pa.array(np.where(has_image, IMAGE_TOKEN + "\n", ""), pa.string())
    user = pc.binary_join_element_wise(prefix, instruction.fill_null(""), "")
    values = pc.take(pa.concat_arrays([user, output.fill_null("")]), np.stack([np.arange(n), np.arange(n) + n], 1).ravel())
    roles = pa.array(np.tile(np.array(["user", "assistant"], dtype=object), n), pa.string())
    offsets = pa.array(np.arange(0, 2 * n + 1, 2, dtype=np.int32))
    turns = pa.ListArray.from_arrays(offsets, pa.StructArray.from_arrays([roles, values], fields=list(TURN)))
    has_reply = _np_bool(_has_text(output))
    has_instruction = _np_bool(_has_text(instruction))
    return turns, has_reply & has_instruction


def normalize(
    table: pa.Table, fmt: str, source: str, first_position: int, image_root: str, default_task: str
) -> Normalized:
    """Canonical columns and a quarantine reason per row (None = kept, pending image and
    duplicate checks, which need state across chunks and live in prepare)."""
    n = table.num_rows
    col = lambda name: table.column(name).combine_chunks()  # noqa: E731
    reason = np.full(n, None, dtype=object)
    detail = np.full(n, None, dtype=object)

    def reject(mask: np.ndarray, why: str, text: str | None = None) -> None:
        fresh = mask & (reason == None)  # noqa: E711 — first reason wins
        reason[fresh] = why
        if text:
            detail[fresh] = text

    if fmt == "vision-flan-raw":
        ident, ref, task = col("instance_id"), col("img_path"), col("task_name")
        dataset = col("dataset_name")
        instruction, output = col("instruction"), col("output")
        has_image = _np_bool(pc.is_valid(ref))
        turns, has_reply = _turns_from_raw(instruction, output, has_image, n)
        reject(_np_bool(pc.is_null(ident)), "missing_fields", "instance_id is missing")
        reject(_np_bool(pc.is_null(task)), "missing_fields", "task_name is missing")
        reject(_np_bool(pc.is_null(instruction)), "missing_fields", "instruction is missing")
        reject(_np_bool(pc.is_null(output)), "missing_fields", "output is missing")
        reject(~has_reply, "empty_conversation", "empty instruction or output")
        input_text, options = col("input_text"), col("options")
        has_token = has_image  # the token is inserted for every row with an image
    else:
        ident, ref = col("id"), col("image")
        if fmt == "vision-flan":
            task = col("task_name")
            reject(_np_bool(pc.is_null(task)), "missing_fields", "task_name is missing")
        else:
            task = pa.array([default_task] * n, pa.string())
        conv = col("conversations")
        turns, lengths, bad_turn, has_reply, has_token = _turns_from_conversations(conv, n)
        reject(_np_bool(pc.is_null(ident)), "missing_fields", "id is missing")
        reject(_np_bool(pc.is_null(conv)), "missing_fields", "conversations is missing")
        reject(bad_turn, "missing_fields", "a turn has an unknown role or no value")
        reject(lengths == 0, "empty_conversation", "no turns")
        reject(~has_reply, "empty_conversation", "no non-empty assistant turn")
        # Vision-Flan task names are "Dataset+Task"; the dataset is the part before '+'.
        dataset = pc.list_element(pc.split_pattern(task.fill_null(""), "+", max_splits=1), 0)
        input_text = pa.nulls(n, pa.string())
        options = pa.nulls(n, pa.list_(pa.string()))

    task = pc.utf8_trim_whitespace(task)
    reject(_np_bool(pc.equal(task, "")), "missing_fields", "task_name is empty")
    has_image = _np_bool(pc.is_valid(ref)) & _np_bool(pc.not_equal(ref, ""))
    reject(has_token & ~has_image, "image_token_without_image")
    reject(has_image & ~has_token, "image_without_token")
    rel = pc.replace_substring_regex(ref, r"^(\./)+", "")
    reject(has_image & _escapes(rel), "image_path_escapes_root", "absolute path, '..' or a URI")
    image = pc.if_else(
        pa.array(has_image), pc.binary_join_element_wise(image_root.rstrip("/"), rel, "/"), pa.nulls(n, pa.string())
    )
    canonical = pa.table(
        {
            "key": pa.nulls(n, pa.string()),  # filled by prepare (needs all three parts)
            "id": ident,
            "task": task,
            "dataset": dataset,
            "image": image,
            "turns": turns,
            "input_text": input_text,
            "options": options,
            "source": pa.array([source] * n, pa.string()) if n else pa.array([], pa.string()),
            "position": pa.array(np.arange(first_position, first_position + n, dtype=np.int64)),
        }
    )
    return Normalized(canonical, ref, reason, detail)


def to_release(rows: list[dict]) -> tuple[list[dict], str | None]:
    """Rows {id, image (a full URI or None), task_name, conversations} in the release
    format, and their image root: the release names images relative to an image root
    (prepare rejects absolute paths as escaping it), here the deepest folder holding them."""
    root = storage.common_parent([r["image"] for r in rows if r["image"]])
    return [{"id": r["id"], "image": r["image"][len(root) + 1:] if r["image"] else None,
             "task_name": r["task_name"], "conversations": r["conversations"]} for r in rows], root


def as_vision_flan(row: dict) -> dict:
    """A generated row (self-instruct, VIGC) in the release shape {id, image, task_name,
    conversations}; VIGC rows keep the corrected answer."""
    if "conversations" in row and row.get("task_name"):
        return {"id": row["id"], "image": row["image"], "task_name": row["task_name"],
                "conversations": [{"from": t["from"], "value": t["value"]} for t in row["conversations"]]}
    answer = row.get("vic_answer") or row["vig_answer"]
    return {"id": row["id"], "image": row["image"], "task_name": f"vigc_{row['type']}",
            "conversations": [{"from": "human", "value": f"{IMAGE_TOKEN}\n{row['question']}"},
                              {"from": "gpt", "value": answer}]}
