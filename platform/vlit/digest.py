"""Content digests: the one way vlit names a version of data.

`TableDigest` hashes Arrow tables column by column with SHA-256. Each column feeds two
running hashes, one of value lengths / validity and one of value bytes, so the result is
the same however the rows are split into batches (a corpus digested while streaming
matches one digested whole), and any change to any value changes it.
"""
from __future__ import annotations

import hashlib
import json

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

DIGEST_CHARS = 20  # 80 bits: ample to name versions, short enough for a folder name


class TableDigest:
    def __init__(self, header: dict):
        # The header (schema version, format, check level...) is part of what is named.
        self._header = json.dumps(header, sort_keys=True)
        self._hashers: dict[str, "hashlib._Hash"] = {}

    def _h(self, key: str):
        h = self._hashers.get(key)
        if h is None:
            h = self._hashers[key] = hashlib.sha256()
        return h

    def update(self, table: pa.Table | pa.RecordBatch) -> None:
        for name, column in zip(table.schema.names, table.columns):
            arr = column.combine_chunks() if isinstance(column, pa.ChunkedArray) else column
            self._feed(name, arr)

    def _feed(self, path: str, arr: pa.Array) -> None:
        t = arr.type
        if pa.types.is_null(t):  # a column with no values at all (e.g. no row has an error)
            self._h(path + "#null").update(np.int64(len(arr)).tobytes())
        elif pa.types.is_string(t) or pa.types.is_binary(t) or pa.types.is_large_string(t):
            lengths = pc.binary_length(arr).fill_null(-1).to_numpy(zero_copy_only=False).astype(np.int64)
            self._h(path + "#len").update(lengths.tobytes())
            data = arr.buffers()[2]
            if data is not None and len(arr):
                offsets = np.frombuffer(arr.buffers()[1], dtype=np.int64 if pa.types.is_large_string(t) else np.int32)
                lo, hi = offsets[arr.offset], offsets[arr.offset + len(arr)]
                self._h(path + "#data").update(memoryview(data)[lo:hi])
        elif pa.types.is_list(t) or pa.types.is_large_list(t):
            lengths = pc.list_value_length(arr).fill_null(-1).to_numpy(zero_copy_only=False).astype(np.int64)
            self._h(path + "#len").update(lengths.tobytes())
            self._feed(path + "[]", arr.flatten())
        elif pa.types.is_struct(t):
            self._h(path + "#valid").update(arr.is_valid().to_numpy(zero_copy_only=False).tobytes())
            for field, child in zip(t, arr.flatten()):
                self._feed(f"{path}.{field.name}", child)
        else:
            self._h(path + "#valid").update(arr.is_valid().to_numpy(zero_copy_only=False).tobytes())
            values = arr.fill_null(0).to_numpy(zero_copy_only=False)
            self._h(path + "#data").update(np.ascontiguousarray(values).tobytes())

    def hexdigest(self) -> str:
        final = hashlib.sha256(self._header.encode())
        for key in sorted(self._hashers):
            final.update(f"{key}={self._hashers[key].hexdigest()};".encode())
        return final.hexdigest()[:DIGEST_CHARS]
