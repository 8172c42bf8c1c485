"""Tasks of a corpus version and their instruction templates.

Vision-Flan gives every task several expert-written instructions. Rows kept in the raw
format (`input_text` / `options` set) can be re-rendered with a different template each
epoch, so the model sees a task phrased several ways rather than memorizing one wording.
Templates are a YAML mapping `task -> [template, ...]` with two slots:

    {input_text}   the row's input text
    {options}      the row's options, formatted "(a) x (b) y ..."

Rendering is vectorized over a batch: templates are compiled into a table of literal
pieces and slots, and a batch is filled with a constant number of pyarrow kernel calls
whatever its size or the number of tasks in it.
"""
from __future__ import annotations

import string
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as pads
import yaml

from vlit import storage
from vlit.corpus.sampling import row_hash
from vlit.corpus.schema import IMAGE_TOKEN, TURN

SLOTS = ("input_text", "options")
_NONE, _INPUT_TEXT, _OPTIONS = 0, 1, 2  # slot codes in the compiled table


class TemplateError(ValueError):
    """A template file or template that cannot be used; the message names task and index."""


@dataclass(frozen=True)
class TaskRegistry:
    """task -> {instances, datasets}, from a column scan of a corpus version."""

    tasks: dict[str, dict]

    @classmethod
    def from_version(cls, version) -> "TaskRegistry":
        fs, _ = storage.filesystem(version.uri)
        paths = [storage.filesystem(uri)[1] for uri in version.shard_uris]
        # Only two columns are read; the group-by runs in Arrow's C++ engine.
        table = pads.dataset(paths, filesystem=fs, format="parquet").to_table(columns=["task", "dataset"])
        groups = table.group_by(["task", "dataset"]).aggregate([([], "count_all")]).to_pylist()
        tasks: dict[str, dict] = {}
        for g in sorted(groups, key=lambda g: (g["task"], g["dataset"] or "")):
            entry = tasks.setdefault(g["task"], {"instances": 0, "datasets": []})
            entry["instances"] += g["count_all"]
            if g["dataset"] is not None:
                entry["datasets"].append(g["dataset"])
        return cls(tasks)

    def to_dict(self) -> dict:
        return {
            "tasks": self.tasks,
            "task_count": len(self.tasks),
            "instances": sum(t["instances"] for t in self.tasks.values()),
        }


def load_templates(uri: str) -> dict[str, list[str]]:
    """Read and validate a template YAML file (local or s3://)."""
    try:
        data = yaml.safe_load(storage.read_bytes(uri))
    except yaml.YAMLError as e:
        raise TemplateError(f"{uri}: not valid YAML: {e}") from None
    if not isinstance(data, dict):
        raise TemplateError(f"{uri}: the top level must map task names to lists of templates")
    try:
        TemplateSet(data)
    except TemplateError as e:
        raise TemplateError(f"{uri}: {e}") from None
    return data


def _compile(task: str, index: int, template) -> list[tuple[str, str | None]]:
    """[(literal, slot or None), ...] for one template; errors name task and index."""
    where = f"task {task!r}, template {index}"
    if not isinstance(template, str):
        raise TemplateError(f"{where}: expected a string, got {type(template).__name__}")
    if IMAGE_TOKEN in template:
        raise TemplateError(f"{where}: must not contain {IMAGE_TOKEN}; rendering places it")
    try:
        pieces = list(string.Formatter().parse(template))
    except ValueError as e:
        raise TemplateError(f"{where}: {e}") from None
    for _, slot, spec, conversion in pieces:
        if slot is not None and (slot not in SLOTS or spec or conversion):
            raise TemplateError(f"{where}: unknown slot {{{slot}}}; known slots: {', '.join(SLOTS)}")
    return [(literal, slot) for literal, slot, _, _ in pieces]


def option_labels(count: int) -> list[str]:
    """a, b, ..., z, aa, ab, ... for `count` options."""
    labels = []
    for i in range(count):
        label = ""
        i += 1
        while i:
            i, r = divmod(i - 1, 26)
            label = chr(ord("a") + r) + label
        labels.append(label)
    return labels


def format_options(options: pa.Array | pa.ChunkedArray) -> pa.Array:
    """list<string> -> "(a) x (b) y ..." per row ("" for null or empty lists)."""
    options = options.combine_chunks() if isinstance(options, pa.ChunkedArray) else options
    lengths = pc.list_value_length(options).fill_null(0).to_numpy()
    flat = pc.list_flatten(options).fill_null("")
    offsets = np.concatenate([[0], np.cumsum(lengths)])
    position = np.arange(len(flat)) - np.repeat(offsets[:-1], lengths)
    labels = pa.array(option_labels(int(lengths.max(initial=0)))).take(position)
    items = pc.binary_join_element_wise("(", labels, ") ", flat, "")
    return pc.binary_join(pa.ListArray.from_arrays(pa.array(offsets, pa.int32()), items), " ")


class TemplateSet:
    """Compiled templates: literal pieces and slot codes per template, as numpy tables."""

    def __init__(self, templates: dict[str, list[str]]):
        compiled, starts, counts = [], [], []
        for task, items in templates.items():
            if not isinstance(items, list) or not items:
                raise TemplateError(f"task {task!r}: expected a non-empty list of templates, got {items!r}")
            starts.append(len(compiled))
            counts.append(len(items))
            compiled.extend(_compile(task, i, t) for i, t in enumerate(items))
        self.tasks = pa.array([str(t) for t in templates], pa.string())
        self.starts = np.array(starts, dtype=np.int64)
        self.counts = np.array(counts, dtype=np.int64)
        width = max((len(c) for c in compiled), default=0)
        # Row g is template g: literal[g, j] precedes slot[g, j]; padding is ("", none).
        self.literals = np.full((len(compiled), width), "", dtype=object)
        self.slots = np.zeros((len(compiled), width), dtype=np.int8)
        codes = {None: _NONE, "input_text": _INPUT_TEXT, "options": _OPTIONS}
        for g, pieces in enumerate(compiled):
            for j, (literal, slot) in enumerate(pieces):
                self.literals[g, j] = literal
                self.slots[g, j] = codes[slot]

    def choose(self, tasks, keys, seed: int, epoch: int, replica=None) -> np.ndarray:
        """Global template index per row (-1: the task has no templates)."""
        index = pc.index_in(tasks, value_set=self.tasks)
        known = pc.is_valid(index).to_numpy(zero_copy_only=False)
        task = index.fill_null(0).to_numpy(zero_copy_only=False).astype(np.int64)
        h = row_hash(keys, seed, epoch, "template")
        if replica is not None:
            # Copies of an upsampled row may get different phrasings.
            h = h + np.asarray(replica, dtype=np.uint64) * np.uint64(0x9E3779B97F4A7C15)
        choice = self.starts[task] + (h % self.counts[task].astype(np.uint64)).astype(np.int64)
        return np.where(known, choice, -1)

    def fill(self, choice: np.ndarray, input_text, options) -> pa.Array:
        """Template text per row, with slots filled (choice must be >= 0)."""
        values = {
            _INPUT_TEXT: pc.fill_null(input_text, ""),
            _OPTIONS: format_options(options),
        }
        parts = []
        for j in range(self.literals.shape[1]):
            parts.append(pa.array(self.literals[choice, j], pa.string()))
            slot = self.slots[choice, j]
            value = pa.repeat("", len(choice))
            for code, column in values.items():
                value = pc.if_else(pa.array(slot == code), column, value)
            parts.append(value)
        return pc.binary_join_element_wise(*parts, "")

    def render(self, table: pa.Table, seed: int, epoch: int) -> pa.Table:
        """Replace the first user turn of raw-format rows whose task has templates."""
        raw = pc.or_(pc.is_valid(table["input_text"]), pc.is_valid(table["options"])).to_numpy()
        replica = table["replica"] if "replica" in table.column_names else None
        choice = self.choose(table["task"], table["key"], seed, epoch, replica)
        turns = table["turns"].combine_chunks()
        first_user = _first_user_turn(turns)
        rows = np.flatnonzero(raw & (choice >= 0) & (first_user >= 0))
        if len(rows) == 0:
            return table
        sub = {name: table[name].take(rows).combine_chunks() for name in ("input_text", "options", "image")}
        text = self.fill(choice[rows], sub["input_text"], sub["options"])
        text = pc.if_else(pc.is_valid(sub["image"]), pc.binary_join_element_wise(IMAGE_TOKEN + "\n", text, ""), text)
        flat = pc.list_flatten(turns)
        mask = np.zeros(len(flat), dtype=bool)
        mask[first_user[rows]] = True  # ascending, like `rows`, as replace_with_mask needs
        contents = pc.replace_with_mask(pc.struct_field(flat, "content"), pa.array(mask), text)
        struct = pa.StructArray.from_arrays([pc.struct_field(flat, "role"), contents], fields=list(TURN))
        lengths = pc.list_value_length(turns).fill_null(0).to_numpy()
        offsets = pa.array(np.concatenate([[0], np.cumsum(lengths)]), pa.int32())
        new_turns = pa.ListArray.from_arrays(offsets, struct, type=table.schema.field("turns").type)
        return table.set_column(table.schema.get_field_index("turns"), "turns", new_turns)


def _first_user_turn(turns: pa.Array) -> np.ndarray:
    """Flat index (into list_flatten(turns)) of each row's first user turn, or -1."""
    lengths = pc.list_value_length(turns).fill_null(0).to_numpy()
    rows = np.repeat(np.arange(len(turns)), lengths)
    roles = pc.struct_field(pc.list_flatten(turns), "role")
    user = np.flatnonzero(pc.equal(roles, "user").fill_null(False).to_numpy(zero_copy_only=False))
    first = np.full(len(turns), -1, dtype=np.int64)
    with_user, at = np.unique(rows[user], return_index=True)
    first[with_user] = user[at]
    return first
