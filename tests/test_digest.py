"""TableDigest: independent of batching, sensitive to every value."""
import pyarrow as pa

from vlit.digest import TableDigest

TABLE = pa.table({
    "s": ["a", None, "ccc", ""],
    "l": [[{"r": "u", "c": "x"}], [], None, [{"r": "a", "c": None}]],
    "n": [1, 2, None, 4],
})


def _digest(*parts) -> str:
    d = TableDigest({"v": 1})
    for p in parts:
        d.update(p)
    return d.hexdigest()


def test_batching_does_not_matter():
    whole = _digest(TABLE)
    assert whole == _digest(TABLE.slice(0, 1), TABLE.slice(1, 2), TABLE.slice(3))
    assert whole == _digest(*TABLE.to_batches(max_chunksize=1))


def test_every_change_changes_it():
    whole = _digest(TABLE)
    variants = [
        TABLE.set_column(0, "s", pa.array(["a", "", "ccc", ""])),  # null vs empty
        TABLE.set_column(0, "s", pa.array(["a", None, "cc", "c"])),  # moved byte between rows
        TABLE.set_column(2, "n", pa.array([1, 2, 0, 4])),
        TABLE.slice(0, 3),
    ]
    digests = {whole} | {_digest(v) for v in variants}
    assert len(digests) == 1 + len(variants)
    other_header = TableDigest({"v": 2})
    other_header.update(TABLE)
    assert other_header.hexdigest() != whole
