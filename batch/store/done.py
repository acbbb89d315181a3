"""What a run has already committed, in bounded memory: the reading side of the commit protocol at scale.

:mod:`batch.store.commit` defines the protocol (parts, latest attempt wins); reading a 10M-row output with
:func:`batch.store.commit.read_metadata` would hold every column of every row. :class:`DoneIndex` reads only
the key columns, one part at a time, into flat numpy arrays (measured: about 80 bytes per committed
record at the peak of building, while sorting; 13 after), and answers the three questions a driver asks:

1. :meth:`DoneIndex.select`: which items and failed rows of a plan chunk this attempt must still do;
2. :meth:`DoneIndex.tally`: the run's counts (rows and images by status, failure reasons);
3. :attr:`DoneIndex.records`: how many records exist (nothing to do when the plan is covered).

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


class DoneIndex:
    """The latest committed record of every key (see the module docstring), built by :meth:`read`."""

    def __init__(self, keys: np.ndarray, status: np.ndarray, num_images: np.ndarray, redecoded: np.ndarray,
                 where: np.ndarray, parts: list[str]):
        self.keys, self.status, self.num_images, self.redecoded = keys, status, num_images, redecoded
        self.where = where  # (part number, row in part) of each latest record, for its error text
        self.parts = parts

    @property
    def records(self) -> int:
        return len(self.keys)

    @classmethod
    def read(cls, out: "Output", parts: list[str] | None = None) -> "DoneIndex":
        """Read the committed parts' key columns, one part at a time, and keep each key's latest record
        (latest ``attempt``; ties: the later part, the later row)."""
        parts = metadata_parts(out) if parts is None else parts
        keys, flags, nimg, attempt, starts = [], [], [], [], [0]
        attempts: dict[str, int] = {}
        for name in parts:
            t = pq.read_table(io.BytesIO(out.get(name)), columns=_COLUMNS)
            keys.append(keys_of(t.column("manifest_row"), t.column("image_index")))
            st = t.column("status")
            code = np.where(pc.equal(st, "ok").to_numpy(zero_copy_only=False), OK,
                            np.where(pc.equal(st, SKIPPED_STATUS).to_numpy(zero_copy_only=False), SKIPPED, FAILED))
            dropped = pc.fill_null(pc.equal(t.column("error"), NSFW_ERROR), False).to_numpy(zero_copy_only=False)
            redecoded = pc.fill_null(t.column("vae_redecoded_fp32"), False).to_numpy(zero_copy_only=False)
            flags.append((np.where(dropped & (code == FAILED), DROPPED, code) | (redecoded.astype(np.int8) << 4)).astype(np.int8))
            nimg.append(pc.fill_null(t.column("num_images"), 0).to_numpy().astype(np.int16))
            enc = pc.dictionary_encode(pc.fill_null(t.column("attempt"), "")).combine_chunks()
            codes = [attempts.setdefault(a, len(attempts)) for a in enc.dictionary.to_pylist()]
            attempt.append(np.asarray(codes, np.int16)[enc.indices.to_numpy()] if len(codes) else
                           np.zeros(t.num_rows, np.int16))
            starts.append(starts[-1] + t.num_rows)
            del t
        if not parts:
            z = np.zeros(0, np.int64)
            return cls(z, z.astype(np.int8), z.astype(np.int16), z.astype(bool), np.zeros((0, 2), np.int64), [])
        # attempt ranks in attempt-id order (ids sort in start order: batch.store.commit.new_attempt_id)
        rank_of_code = np.empty(len(attempts), np.int16)
        rank_of_code[[attempts[a] for a in sorted(attempts)]] = np.arange(len(attempts))
        order_key = np.concatenate(keys)
        del keys
        order_key *= len(attempts)
        order_key += rank_of_code[np.concatenate(attempt)]  # int16 temporaries, added in place
        del attempt
        # a stable sort by (key, attempt rank): among equal ones, commit order (the later part, the later row)
        order = np.argsort(order_key, kind="stable")
        sorted_key = order_key[order]
        del order_key
        sorted_key //= len(attempts)
        last = np.ones(len(order), bool)
        last[:-1] = sorted_key[1:] != sorted_key[:-1]
        pick = order[last]
        del order
        flags_a, nimg_a = np.concatenate(flags)[pick], np.concatenate(nimg)[pick]
        part = np.searchsorted(np.asarray(starts), pick, side="right") - 1
        where = np.stack([part, pick - np.asarray(starts)[part]], axis=1)
        return cls(sorted_key[last], flags_a & 0x0F, nimg_a, (flags_a >> 4).astype(bool), where, list(parts))

    def _lookup(self, keys: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(found, status code) of ``keys`` (status meaningful where found)."""
        if not len(self.keys):
            return np.zeros(len(keys), bool), np.zeros(len(keys), np.int8)
        pos = np.searchsorted(self.keys, keys)
        pos_c = np.minimum(pos, len(self.keys) - 1)
        found = self.keys[pos_c] == keys
        return found, self.status[pos_c]

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
        """The run's counts (as :func:`batch.run.stats.tally` over the latest records), vectorised; the error
        texts of failed records are read back from their parts and counted by ``failure_reason``
        (:func:`batch.plan.manifest.failure_reason`)."""
        row = self.keys // KEY_STRIDE  # sorted, as the keys are: groups without another sort
        is_image = (self.keys % KEY_STRIDE) != 0
        bad = (self.status != OK) & (self.status != SKIPPED)
        failed_rows = np.unique(row[bad])
        ok_img = is_image & ~bad  # done: generated, or reused from an earlier run
        ok_row = row[ok_img]
        del row
        starts = np.flatnonzero(np.r_[True, ok_row[1:] != ok_row[:-1]]) if len(ok_row) else np.zeros(0, np.int64)
        counts = np.diff(np.r_[starts, len(ok_row)])
        ok_rows = ok_row[starts]
        complete = counts == self.num_images[ok_img][starts]
        pos = np.minimum(np.searchsorted(failed_rows, ok_rows), max(len(failed_rows) - 1, 0))
        also_failed = failed_rows[pos] == ok_rows if len(failed_rows) else np.zeros(len(ok_rows), bool)
        rows_ok = int(np.count_nonzero(complete & ~also_failed))
        images = int(np.count_nonzero(is_image))
        images_done = int(np.count_nonzero(ok_img))
        images_reused = int(np.count_nonzero(is_image & (self.status == SKIPPED)))
        reasons: Counter = Counter()
        bad_where = self.where[bad]
        for p in np.unique(bad_where[:, 0]):
            t = pq.read_table(io.BytesIO(out.get(self.parts[p])), columns=["error"])
            errors = t.column("error").take(pa.array(bad_where[bad_where[:, 0] == p, 1])).to_pylist()
            reasons.update(failure_reason(e or "unknown") for e in errors)
        return {"rows": rows, "rows_ok": rows_ok, "rows_failed": int(len(failed_rows)),
                "images_ok": images_done - images_reused, "images_reused": images_reused,
                "images_failed": images - images_done,
                "images_pending": max(0, (images_planned or 0) - images),
                "images_redecoded_fp32": int(np.count_nonzero(self.redecoded)),
                "failure_reasons": dict(reasons)}
