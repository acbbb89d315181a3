"""Vectorised row validation: Arrow compute kernels decide which rows are plainly good; only the others go
through the task's per-row Python check.

Why two paths: a per-row Python check costs about 100 µs a row (1M rows: two minutes), while Arrow kernels
check a whole column at once. Keeping the error texts identical is then free: a row the kernels cannot
vouch for (any doubt at all: a non-ASCII id, a float in an integer column, a NaN, a value out of range, a
column of an unexpected type) is handed to :attr:`batch.tasks.base.Task.validate_row`, the one place every
rule and error text lives. The kernels only ever *accept*; they never reject. So the result is the per-row
result by construction, and ``tests/test_plan_vector.py`` checks it on random manifests full of bad values.

:func:`fast_rows` returns the plainly good rows' effective values as columns (defaults filled, seeds not yet
derived); :func:`split_rows` gives the mask. Tasks without a fast path here (the image tasks, whose
``image_uri`` location rules are per-row Python) send every row to the per-row check.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from batch.plan.rows import MAX_ID_CHARS
from batch.spec.base import MAX_SEED, SCHEDULER_NAMES
from batch.tasks.txt2img import int_ranges

if TYPE_CHECKING:
    from batch.spec.config import JobSpec

# An id the kernels accept: printable ASCII without path separators or "%" (URL-encoding), not blank, not a
# dot segment; anything else goes to batch.plan.rows.check_id.
_PLAIN_ID = r"^[ -~]+$"  # printable ASCII; separators, "%" and blanks are excluded below
_HAS_WORD = r"[A-Za-z0-9]"  # a prompt the kernels accept has an ASCII letter or digit (str.strip() is unicode-aware)

FAST_TASKS = ("txt2img",)


def _column(table: pa.Table, name: str) -> pa.ChunkedArray | None:
    return table.column(name) if name in table.column_names else None


def _plain_ids(ids: pa.ChunkedArray | None, n: int) -> pa.ChunkedArray | pa.Array:
    """Rows whose id is plainly valid (see :func:`batch.plan.rows.check_id`): printable ASCII, no ``/``,
    ``\\`` or ``%``, at most ``MAX_ID_CHARS``, not blank, not ``.``/``..``."""
    if ids is None or not (pa.types.is_string(ids.type) or pa.types.is_large_string(ids.type)):
        return pa.array(np.zeros(n, dtype=bool))
    ok = pc.match_substring_regex(ids, _PLAIN_ID)
    for bad in ("/", "\\", "%"):
        ok = pc.and_(ok, pc.invert(pc.match_substring(ids, bad)))
    ok = pc.and_(ok, pc.match_substring_regex(ids, r"[^ ]"))  # not blank (only ASCII here, so " " is the blank)
    ok = pc.and_(ok, pc.less_equal(pc.utf8_length(ids), MAX_ID_CHARS))
    ok = pc.and_(ok, pc.invert(pc.is_in(ids, value_set=pa.array([".", ".."]))))
    return pc.fill_null(ok, False)


def split_rows(table: pa.Table, spec: "JobSpec") -> np.ndarray:
    """Boolean mask of the rows the kernels accept (every rule of ``validate_row`` plainly met); all False for
    tasks without a fast path."""
    n = table.num_rows
    if spec.task not in FAST_TASKS:
        return np.zeros(n, dtype=bool)
    d, lim = spec.defaults, spec.limits
    ok = _plain_ids(_column(table, "id"), n)
    # prompt: a string with an ASCII word character, no longer than the limit
    prompt = _column(table, "prompt")
    if prompt is None or not pa.types.is_string(prompt.type):
        return np.zeros(n, dtype=bool)
    ok = pc.and_(ok, pc.fill_null(pc.and_(pc.match_substring_regex(prompt, _HAS_WORD),
                                          pc.less_equal(pc.utf8_length(prompt), lim.max_prompt_chars)), False))
    # negative_prompt: a string column (nulls take the default, itself a string or null)
    neg = _column(table, "negative_prompt")
    if neg is not None and not (pa.types.is_string(neg.type) or pa.types.is_null(neg.type)):
        ok = pc.and_(ok, pc.is_null(neg))
    # guidance_scale: finite, > 0, at most limits.max_guidance_scale
    g = _column(table, "guidance_scale")
    if g is None or pa.types.is_null(g.type):
        good_g = 0 < d.guidance_scale <= lim.max_guidance_scale
        ok = pc.and_(ok, pa.scalar(bool(good_g)))
    elif pa.types.is_integer(g.type) or pa.types.is_floating(g.type):
        gv = pc.cast(pc.fill_null(g, d.guidance_scale), pa.float64())
        ok = pc.and_(ok, pc.fill_null(pc.and_(pc.and_(pc.is_finite(gv), pc.greater(gv, 0.0)),
                                              pc.less_equal(gv, float(lim.max_guidance_scale))), False))
    else:
        return np.zeros(n, dtype=bool)
    # the integer fields: integer columns in range (height/width multiples of 8); floats go to the per-row check
    for field, lo, hi in int_ranges(lim):  # the per-row check's own ranges
        col = _column(table, field)
        default = getattr(d, field)
        good_default = lo <= default <= hi and (field not in ("height", "width") or default % 8 == 0)
        if col is None or pa.types.is_null(col.type):
            ok = pc.and_(ok, pa.scalar(good_default))
            continue
        if not pa.types.is_integer(col.type):  # floats (whole or not), strings, ...: only nulls (the default) here
            ok = pc.and_(ok, pc.is_null(col)) if good_default else pa.array(np.zeros(n, dtype=bool))
            continue
        v = pc.cast(pc.fill_null(col, default), pa.int64())
        good = pc.and_(pc.greater_equal(v, lo), pc.less_equal(v, hi))
        if field in ("height", "width"):
            good = pc.and_(good, pc.equal(pc.bit_wise_and(v, 7), 0))
        ok = pc.and_(ok, pc.fill_null(good, False))
    # scheduler: a known name
    s = _column(table, "scheduler")
    names = pa.array(["model", *SCHEDULER_NAMES])
    if s is None or pa.types.is_null(s.type):
        ok = pc.and_(ok, pa.scalar(d.scheduler in names.to_pylist()))
    elif pa.types.is_string(s.type):
        ok = pc.and_(ok, pc.fill_null(pc.is_in(pc.fill_null(s, d.scheduler), value_set=names), False))
    else:
        return np.zeros(n, dtype=bool)
    # seed: null (derived) or an integer in [0, 2**63)
    seed = _column(table, "seed")
    if seed is not None and not pa.types.is_null(seed.type):
        if pa.types.is_signed_integer(seed.type):
            ok = pc.and_(ok, pc.fill_null(pc.greater_equal(seed, 0), True))
        elif pa.types.is_unsigned_integer(seed.type):
            ok = pc.and_(ok, pc.fill_null(pc.less(seed, pa.scalar(MAX_SEED, pa.uint64())), True))
        else:
            ok = pc.and_(ok, pc.is_null(seed))
    arr = ok.combine_chunks() if isinstance(ok, pa.ChunkedArray) else ok
    if isinstance(arr, pa.Scalar):
        return np.full(n, bool(arr.as_py()), dtype=bool)
    return np.asarray(arr.to_numpy(zero_copy_only=False), dtype=bool)


def fast_rows(table: pa.Table, spec: "JobSpec") -> dict[str, pa.Array]:
    """Effective values of rows the kernels accepted (``table`` holds only those): the columns
    ``validate_row`` would return, except ``row_seed`` for rows without a seed (null here, derived by the
    caller: :func:`batch.plan.seeds.derive_row_seed`)."""
    d, n = spec.defaults, table.num_rows

    def filled(name: str, default, type_: pa.DataType) -> pa.Array:
        col = _column(table, name)
        # all null (also a column of another type, whose accepted rows are exactly its nulls): the default
        if col is None or pa.types.is_null(col.type) or col.null_count == len(col):
            return pa.nulls(n, type_) if default is None else pa.array(np.full(n, default), type_) \
                if not isinstance(default, str) else pa.array([default] * n, type_)
        col = col.combine_chunks()
        if default is not None:
            col = pc.fill_null(col, default)
        return pc.cast(col, type_)

    seed = _column(table, "seed")
    if seed is None or pa.types.is_null(seed.type):
        seed_arr = pa.nulls(n, pa.uint64())
    else:
        seed_arr = pc.cast(seed.combine_chunks(), pa.uint64())
    source = pc.if_else(pc.is_null(seed_arr), "derived", "manifest")
    return {
        "id": pc.cast(table.column("id").combine_chunks(), pa.string()),
        "prompt": pc.cast(table.column("prompt").combine_chunks(), pa.string()),
        "negative_prompt": filled("negative_prompt", d.negative_prompt, pa.string()),
        "guidance_scale": filled("guidance_scale", d.guidance_scale, pa.float64()),
        "num_inference_steps": filled("num_inference_steps", d.num_inference_steps, pa.int32()),
        "height": filled("height", d.height, pa.int32()),
        "width": filled("width", d.width, pa.int32()),
        "num_images": filled("num_images", d.num_images, pa.int32()),
        "scheduler": filled("scheduler", d.scheduler, pa.string()),
        "row_seed": seed_arr,
        "seed_source": source,
    }
