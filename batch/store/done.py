"""What a run has already committed, in bounded memory: the reading side of the commit protocol at scale.

:mod:`batch.store.commit` defines the protocol (parts, latest attempt wins); reading a 10M-row output with
:func:`batch.store.commit.read_metadata` would hold every column of every row. :class:`DoneIndex` reads only
the key columns, one part at a time, and spills each record (21 bytes) to a local temp file of its partition
(``PARTITION_ROWS`` manifest rows); a partition's latest records (:class:`Latest`) are built when needed, one
partition in memory at a time, so memory is bounded by the partition, not the output. It answers the three
questions a driver asks:

1. :meth:`DoneIndex.select`: which items and failed rows of a plan chunk this attempt must still do;
2. :meth:`DoneIndex.tally`: the run's counts (rows and images by status, failure reasons);
3. :attr:`DoneIndex.records`: how many records earlier attempts committed (all of them, superseded ones too).

A record's key is ``manifest_row * KEY_STRIDE + image_index + 1`` (``0`` for a failed manifest row), the
integer form of :func:`batch.store.commit.row_key`.
"""

from __future__ import annotations

import io
from collections import Counter
from typing import TYPE_CHECKING, Any, Callable

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from batch.store.commit import metadata_parts
from batch.store.schema import NSFW_ERROR
from batch.store.schema import SKIPPED as SKIPPED_STATUS

if TYPE_CHECKING:
    from batch.store.io import Output

KEY_STRIDE = 1 << 16  # more than limits.max_images_per_row allows
# status codes; DROPPED: failed by the safety checker (retry-failed leaves it); SKIPPED: done, an earlier run
# holds the image (dedup_against)
OK, FAILED, DROPPED, SKIPPED = 0, 1, 2, 3
_COLUMNS = ["manifest_row", "image_index", "num_images", "status", "error", "vae_redecoded_fp32", "attempt"]


def keys_of(manifest_row: pa.Array | np.ndarray, image_index: pa.Array | None) -> np.ndarray:
    """Integer record keys of (manifest row, image index or null for a failed row)."""
    rows = np.asarray(pc.fill_null(manifest_row, 0).to_numpy() if isinstance(manifest_row, (pa.Array, pa.ChunkedArray))
                      else manifest_row, dtype=np.int64)
    if image_index is None:
        return rows * KEY_STRIDE
    k = pc.fill_null(pc.add(pc.cast(image_index, pa.int64()), 1), 0).to_numpy()
    return rows * KEY_STRIDE + np.asarray(k, dtype=np.int64)


_SPILL = np.dtype([("key", "<i8"), ("code", "<i2"), ("flags", "i1"), ("nimg", "<i2"), ("part", "<i4"),
                   ("row", "<i4")])  # one committed record in a partition's spill file: 21 bytes
PARTITION_ROWS = 1 << 22  # manifest rows per partition: one partition's records are in memory at a time


class Latest:
    """The latest record of every key of one partition (sorted keys), from its spilled records."""

    def __init__(self, rec: np.ndarray, rank_of_code: np.ndarray):
        n_att = max(1, len(rank_of_code))
        order_key = rec["key"].astype(np.int64) * n_att
        order_key += rank_of_code[rec["code"]] if len(rank_of_code) else 0
        # a stable sort by (key, attempt rank): among equal ones, commit order (the later part, the later row)
        order = np.argsort(order_key, kind="stable")
        sorted_key = order_key[order]
        del order_key
        sorted_key //= n_att
        last = np.ones(len(order), bool)
        last[:-1] = sorted_key[1:] != sorted_key[:-1]
        pick = order[last]
        del order
        flags = rec["flags"][pick]
        self.keys = sorted_key[last]
        self.status, self.redecoded = flags & 0x0F, (flags >> 4).astype(bool)
        self.num_images = rec["nimg"][pick]
        self.where = np.stack([rec["part"][pick], rec["row"][pick]], axis=1)  # for the error texts

    def lookup(self, keys: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(found, status code) of ``keys`` (status meaningful where found)."""
        if not len(self.keys):
            return np.zeros(len(keys), bool), np.zeros(len(keys), np.int8)
        pos = np.minimum(np.searchsorted(self.keys, keys), len(self.keys) - 1)
        return self.keys[pos] == keys, self.status[pos]

    def counts(self) -> dict[str, Any]:
        """This partition's counts (rows never span partitions) and where its failed records are."""
        row = self.keys // KEY_STRIDE  # sorted, as the keys are: groups without another sort
        is_image = (self.keys % KEY_STRIDE) != 0
        bad = (self.status != OK) & (self.status != SKIPPED)
        failed_rows = np.unique(row[bad])
        ok_img = is_image & ~bad  # done: generated, or reused from an earlier run
        ok_row = row[ok_img]
        starts = np.flatnonzero(np.r_[True, ok_row[1:] != ok_row[:-1]]) if len(ok_row) else np.zeros(0, np.int64)
        complete = np.diff(np.r_[starts, len(ok_row)]) == self.num_images[ok_img][starts]
        ok_rows = ok_row[starts]
        pos = np.minimum(np.searchsorted(failed_rows, ok_rows), max(len(failed_rows) - 1, 0))
        also_failed = failed_rows[pos] == ok_rows if len(failed_rows) else np.zeros(len(ok_rows), bool)
        images_done = int(np.count_nonzero(ok_img))
        images_reused = int(np.count_nonzero(is_image & (self.status == SKIPPED)))
        return {"rows_ok": int(np.count_nonzero(complete & ~also_failed)), "rows_failed": int(len(failed_rows)),
                "images": int(np.count_nonzero(is_image)), "images_ok": images_done - images_reused,
                "images_reused": images_reused, "images_failed": int(np.count_nonzero(is_image)) - images_done,
                "images_redecoded_fp32": int(np.count_nonzero(self.redecoded)), "bad_where": self.where[bad]}


class DoneIndex:
    """What a run committed, in bounded memory (see the module docstring), built by :meth:`read`.

    One pass over the parts' key columns spills every record (21 bytes) to a local temp file per partition of
    ``PARTITION_ROWS`` manifest rows; a partition's latest records (:class:`Latest`) are built when a plan
    chunk or the count needs them, one partition in memory at a time."""

    def __init__(self, spill_dir: Any, partitions: dict[int, str], rank_of_code: np.ndarray, parts: list[str],
                 records: int, partition_rows: int):
        self._dir, self.partitions, self.rank_of_code = spill_dir, partitions, rank_of_code
        self.parts, self.records, self.partition_rows = parts, records, partition_rows
        self._cached: tuple[int, Latest] | None = None

    @classmethod
    def read(cls, out: "Output", parts: list[str] | None = None,
             partition_rows: int | None = None) -> "DoneIndex":
        """Read the committed parts' key columns, one part at a time, into the partitions' spill files."""
        import tempfile

        partition_rows = partition_rows or PARTITION_ROWS
        parts = metadata_parts(out) if parts is None else parts
        spill_dir = tempfile.TemporaryDirectory(prefix="sdbatch-done-")
        files: dict[int, Any] = {}
        attempts: dict[str, int] = {}
        records = 0
        for p, name in enumerate(parts):
            t = pq.read_table(io.BytesIO(out.get(name)), columns=_COLUMNS)
            rec = np.empty(t.num_rows, _SPILL)
            rec["key"] = keys_of(t.column("manifest_row"), t.column("image_index"))
            st = t.column("status")
            code = np.where(pc.equal(st, "ok").to_numpy(zero_copy_only=False), OK,
                            np.where(pc.equal(st, SKIPPED_STATUS).to_numpy(zero_copy_only=False), SKIPPED, FAILED))
            dropped = pc.fill_null(pc.equal(t.column("error"), NSFW_ERROR), False).to_numpy(zero_copy_only=False)
            redecoded = pc.fill_null(t.column("vae_redecoded_fp32"), False).to_numpy(zero_copy_only=False)
            rec["flags"] = np.where(dropped & (code == FAILED), DROPPED, code) | (redecoded.astype(np.int8) << 4)
            rec["nimg"] = pc.fill_null(t.column("num_images"), 0).to_numpy()
            enc = pc.dictionary_encode(pc.fill_null(t.column("attempt"), "")).combine_chunks()
            codes = [attempts.setdefault(a, len(attempts)) for a in enc.dictionary.to_pylist()]
            rec["code"] = np.asarray(codes, np.int16)[enc.indices.to_numpy()] if codes else 0
            rec["part"], rec["row"] = p, np.arange(t.num_rows)
            del t
            partition = rec["key"] // (KEY_STRIDE * partition_rows)
            for q in np.unique(partition).tolist():
                if q not in files:
                    files[q] = open(f"{spill_dir.name}/p{q:08d}", "wb")
                rec[partition == q].tofile(files[q])
            records += len(rec)
        for f in files.values():
            f.close()
        # attempt ranks in attempt-id order (ids sort in start order: batch.store.commit.new_attempt_id)
        rank_of_code = np.empty(len(attempts), np.int64)
        rank_of_code[[attempts[a] for a in sorted(attempts)]] = np.arange(len(attempts))
        return cls(spill_dir, {q: f.name for q, f in files.items()}, rank_of_code, list(parts), records,
                   partition_rows)

    def latest(self, partition: int) -> Latest:
        """The latest records of one partition (the last one asked for is kept)."""
        if self._cached is None or self._cached[0] != partition:
            self._cached = None
            rec = np.fromfile(self.partitions[partition], dtype=_SPILL) if partition in self.partitions \
                else np.zeros(0, _SPILL)
            self._cached = (partition, Latest(rec, self.rank_of_code))
        return self._cached[1]

    def _lookup(self, keys: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        found, status = np.zeros(len(keys), bool), np.zeros(len(keys), np.int8)
        partition = keys // (KEY_STRIDE * self.partition_rows)
        for q in np.unique(partition).tolist():
            sel = partition == q
            found[sel], status[sel] = self.latest(q).lookup(keys[sel])
        return found, status

    def select(self, items: pa.Table, failed: pa.Table, mode: str) -> tuple[pa.Table, pa.Table]:
        """The items to generate and the failed rows to commit in this attempt (vectorised
        :func:`batch.store.commit.select_work`): ``run``: everything without a record; ``retry_failed``: also
        images whose latest record failed, except safety-checker drops."""
        found, status = self._lookup(keys_of(items.column("manifest_row"), items.column("image_index")))
        keep = ~found if mode != "retry_failed" else ~found | (status == FAILED)
        f_found, _ = self._lookup(keys_of(failed.column("manifest_row"), None))
        return items.filter(pa.array(keep)), failed.filter(pa.array(~f_found))

    def tally(self, out: "Output", rows: int, images_planned: int,
              failure_reason: Callable[[str], str] = str) -> dict[str, Any]:
        """The run's counts (as :func:`batch.run.stats.tally` over the latest records), partition by partition;
        the error texts of failed records are read back from their parts and counted by ``failure_reason``
        (:func:`batch.plan.manifest.failure_reason`)."""
        total: Counter = Counter()
        reasons: Counter = Counter()
        for q in sorted(self.partitions):
            c = self.latest(q).counts()
            bad_where = c.pop("bad_where")
            total.update(c)
            for p in np.unique(bad_where[:, 0]).tolist():
                t = pq.read_table(io.BytesIO(out.get(self.parts[p])), columns=["error"])
                errors = t.column("error").take(pa.array(bad_where[bad_where[:, 0] == p, 1])).to_pylist()
                reasons.update(failure_reason(e or "unknown") for e in errors)
        keys = ("rows_ok", "rows_failed", "images_ok", "images_reused", "images_failed", "images_redecoded_fp32")
        return {"rows": rows, **{k: int(total[k]) for k in keys},
                "images_pending": max(0, (images_planned or 0) - int(total["images"])),
                "failure_reasons": dict(reasons)}
