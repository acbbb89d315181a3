"""Duplicate row ids over a manifest of any size, in bounded memory; and row hashes (:func:`hash_rows`).

A duplicate id fails every row that holds it (neither occurrence is trusted), so all ids must be seen
before the first row runs. Holding 100M ids in a Python set would take ~10 GB; instead
(a hash-partitioned pass, as external-memory group-bys do):

1. :meth:`DuplicateFinder.add`: each chunk's ids are hashed to 64 bits (:func:`hash_strings`, vectorised
   FNV-1a over 8-byte words, then a SplitMix64 finaliser) and the (hash, row) pairs are appended to one of
   ``PARTITIONS`` spill files chosen by the hash's top bits;
2. :meth:`DuplicateFinder.finish`: each partition is loaded alone (16 bytes per row / ``PARTITIONS``), sorted,
   and rows whose hash occurs twice become candidates; a second pass over the ids reads the candidates'
   actual ids, so a hash collision between different ids never fails a row.

Cost: 16 bytes of temporary disk per row, one partition in memory at a time (10M rows: ~2.5 MB each), and
a second read of the id column only when a candidate exists.
"""

from __future__ import annotations

import os
import tempfile
from typing import Iterable

import numpy as np
import pyarrow as pa

PARTITIONS = 64
_FNV_OFFSET = np.uint64(0xCBF29CE484222325)
_FNV_PRIME = np.uint64(0x100000001B3)


def _splitmix(h: np.ndarray) -> np.ndarray:
    """SplitMix64's finaliser (Steele, Lea, Flood 2014): spreads every input bit over the output."""
    h = (h ^ (h >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    h = (h ^ (h >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return h ^ (h >> np.uint64(31))


def hash_strings(arr: pa.Array) -> tuple[np.ndarray, np.ndarray]:
    """64-bit hashes of a string array's values and the mask of values that are strings (nulls are not ids).

    FNV-1a over little-endian 8-byte words of the UTF-8 bytes (zero-padded), seeded with the length, then
    :func:`_splitmix`. Vectorised over rows: one numpy step per 8 bytes of the longest value, over only the
    rows that long.
    """
    if isinstance(arr, pa.ChunkedArray):
        arr = arr.combine_chunks()
    if not (pa.types.is_string(arr.type) or pa.types.is_large_string(arr.type)):
        return np.zeros(len(arr), np.uint64), np.zeros(len(arr), bool)
    if pa.types.is_large_string(arr.type):
        arr = arr.cast(pa.string())
    n = len(arr)
    valid = np.ones(n, bool) if arr.null_count == 0 else arr.is_valid().to_numpy(zero_copy_only=False)
    bufs = arr.buffers()
    offsets = np.frombuffer(bufs[1], dtype=np.int32)[arr.offset:arr.offset + n + 1].astype(np.int64)
    data = np.frombuffer(bufs[2], dtype=np.uint8) if bufs[2] is not None else np.zeros(0, np.uint8)
    data = np.concatenate([data, np.zeros(16, np.uint8)])
    # the 8 byte alignments of the data as uint64 arrays: the word at byte p is views[p % 8][p // 8]
    m = (len(data) - 8) // 8
    views = [data[a:a + 8 * m].view("<u8") for a in range(8)]
    lengths = np.diff(offsets)
    h = _FNV_OFFSET ^ lengths.astype(np.uint64)
    with np.errstate(over="ignore"):
        for a in range(8):  # a value's alignment (offset % 8) is the same for all its words
            rows = np.flatnonzero((lengths > 0) & (offsets[:-1] % 8 == a))
            rows = rows[np.argsort(-lengths[rows], kind="stable")]  # longest first: the rows left are a prefix
            lens, word_at, hh = lengths[rows], offsets[rows] // 8, h[rows]
            j, live = 0, len(rows)
            while live:
                words = views[a][word_at[:live] + j // 8]
                rem = lens[:live] - j  # bytes of this value left; keep at most 8 of them
                short = rem < 8
                if short.any():
                    words[short] &= (np.uint64(1) << (rem[short].astype(np.uint64) * np.uint64(8))) - np.uint64(1)
                hh[:live] = (hh[:live] ^ words) * _FNV_PRIME
                j += 8
                live = int(np.count_nonzero(lens[:live] > j))
            h[rows] = hh
        h = _splitmix(h)
    return h, valid


class DuplicateFinder:
    """Finds ids that occur more than once in a stream of id chunks (see the module docstring)."""

    def __init__(self, partitions: int = PARTITIONS, tmp_dir: str | None = None):
        self.partitions = partitions
        self._tmp = tempfile.TemporaryDirectory(prefix="sdbatch-dups-", dir=tmp_dir)  # removed when collected
        self.dir = self._tmp.name
        self.files = [open(os.path.join(self.dir, f"p{p:03d}"), "wb") for p in range(partitions)]
        self.rows = 0

    def add(self, ids: pa.Array | pa.ChunkedArray) -> None:
        """Hash the next chunk's ids (rows numbered on from the previous chunk) into the spill partitions."""
        h, valid = hash_strings(ids)
        rows = np.arange(self.rows, self.rows + len(h), dtype=np.int64)
        self.rows += len(h)
        h, rows = h[valid], rows[valid]
        part = (h >> np.uint64(58)).astype(np.int64) % self.partitions
        order = np.argsort(part, kind="stable")
        h, rows, part = h[order], rows[order], part[order]
        bounds = np.searchsorted(part, np.arange(self.partitions + 1))
        for p in range(self.partitions):
            a, b = bounds[p], bounds[p + 1]
            if b > a:
                pairs = np.empty(b - a, dtype=[("h", "<u8"), ("row", "<i8")])
                pairs["h"], pairs["row"] = h[a:b], rows[a:b]
                pairs.tofile(self.files[p])

    def candidates(self) -> np.ndarray:
        """Sorted rows whose id hash occurs more than once (one partition in memory at a time)."""
        found = []
        for f in self.files:
            f.close()
        for p in range(self.partitions):
            pairs = np.fromfile(os.path.join(self.dir, f"p{p:03d}"), dtype=[("h", "<u8"), ("row", "<i8")])
            if len(pairs) < 2:
                continue
            h = np.sort(pairs["h"])  # a plain uint64 sort (a structured sort is ~10x slower)
            twice = h[1:][h[1:] == h[:-1]]
            if len(twice):
                found.append(pairs["row"][np.isin(pairs["h"], twice)])
        self._tmp.cleanup()
        return np.sort(np.concatenate(found)) if found else np.zeros(0, np.int64)

    def finish(self, id_chunks_again: Iterable[pa.Array | pa.ChunkedArray]) -> dict[int, list[int]]:
        """Manifest row -> every row with the same id, for ids that occur more than once. ``id_chunks_again``
        iterates the same id chunks once more; it is read only when a hash occurs twice."""
        cand = self.candidates()
        if not len(cand):
            return {}
        positions: dict[str, list[int]] = {}
        start = 0
        for ids in id_chunks_again:
            n = len(ids)
            local = cand[(cand >= start) & (cand < start + n)] - start
            if len(local):
                values = (ids.combine_chunks() if isinstance(ids, pa.ChunkedArray) else ids).take(pa.array(local))
                for row, rid in zip((local + start).tolist(), values.to_pylist()):
                    positions.setdefault(rid, []).append(row)
            start += n
        return {row: rows for rows in positions.values() if len(rows) > 1 for row in rows}


_NULL = np.uint64(0x9E3779B97F4A7C15)


def _column_hash(col: pa.Array) -> np.ndarray:
    """64-bit hashes of one column's values (nulls hash to a constant of their own)."""
    t = col.type
    n = len(col)
    if pa.types.is_string(t) or pa.types.is_large_string(t):
        h, _ = hash_strings(col)
    elif pa.types.is_binary(t) or pa.types.is_large_binary(t):
        h, _ = hash_strings(pa.array([None if v is None else v.hex() for v in col.to_pylist()], pa.string()))
    elif pa.types.is_integer(t) or pa.types.is_boolean(t):
        h = _splitmix(np.asarray(col.cast(pa.int64()).fill_null(0).to_numpy(), dtype=np.int64).view(np.uint64))
    elif pa.types.is_floating(t):
        h = _splitmix(np.asarray(col.cast(pa.float64()).fill_null(0).to_numpy(), dtype=np.float64).view(np.uint64))
    elif pa.types.is_null(t):
        h = np.zeros(n, np.uint64)
    else:  # nested or rare types: their repr (slow, but such carried columns are rare)
        h, _ = hash_strings(pa.array([None if v is None else repr(v) for v in col.to_pylist()], pa.string()))
    if col.null_count:
        h = np.where(col.is_null().to_numpy(zero_copy_only=False), _NULL, h)
    return h


def hash_rows(table: pa.Table) -> np.ndarray:
    """One 64-bit hash per row over every column (in order), to tell whether a manifest row changed
    (``sdbatch extend``: :mod:`batch.run.job`). Column names and types are compared separately."""
    h = np.full(table.num_rows, _FNV_OFFSET, np.uint64)
    with np.errstate(over="ignore"):
        for col in table.columns:
            h = _splitmix((h * _FNV_PRIME) ^ _column_hash(col.combine_chunks()))
    return h
