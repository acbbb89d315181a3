"""Checks shared by every task's row validation: ids, numbers, scheduler, seed; and the bucket key.

A task module (``batch.tasks``) validates its own columns and calls these for the rest, so one rule (and
one error text) per field, whatever the task. A bad row raises :class:`RowError` with every
``(field, reason)`` found; only that row fails.
"""

from __future__ import annotations

import math
import unicodedata
import urllib.parse
from typing import TYPE_CHECKING, Any, Callable

from batch.plan.seeds import derive_row_seed, effective_run_seed
from batch.spec.base import MAX_SEED, SCHEDULER_NAMES

if TYPE_CHECKING:
    from batch.spec.config import JobSpec

MAX_ID_CHARS = 512
BUCKET_FIELDS = ("height", "width", "num_inference_steps", "guidance_scale", "scheduler")


class RowError(ValueError):
    """One row is invalid; ``problems`` lists ``(field, reason)`` pairs."""

    def __init__(self, problems: list[tuple[str, str]]):
        self.problems = problems
        super().__init__("; ".join(f"{f}: {r}" for f, r in problems))


# Characters that act as, or look like, path separators once decoded or normalised.
_SEPARATOR_LOOKALIKES = "/\\\u2215\u2044\u29f8\u29f9\u2216\ufe68\uff0f\uff3c\u2571\u2572"


def check_id(rid: Any) -> str | None:
    """Why ``rid`` cannot be a row id, or None. Ids are names, not paths.

    Refused: non-strings, empty or blank, longer than ``MAX_ID_CHARS``, control characters (NUL, newlines,
    unicode line/paragraph separators), and anything that reads as a path once URL-decoded (repeatedly)
    and NFKC-normalised: ``/``, ``\\`` or a look-alike separator, a ``.``/``..`` segment. A colon is fine
    (``q:colon``; a Windows drive path also needs a separator, refused above). Output keys never derive from
    the raw id anyway: see :func:`batch.store.io.image_key`.
    """
    if not isinstance(rid, str) or not rid.strip():
        return f"must be a non-empty string, got {rid!r}"
    if len(rid) > MAX_ID_CHARS:
        return f"longer than {MAX_ID_CHARS} characters, got {len(rid)}"
    if any(unicodedata.category(c) in ("Cc", "Cf", "Zl", "Zp") for c in rid):
        bad = next(c for c in rid if unicodedata.category(c) in ("Cc", "Cf", "Zl", "Zp"))
        return f"contains a control or separator character U+{ord(bad):04X}, got {rid[:80]!r}"
    forms, text = [rid], rid
    for _ in range(3):  # %2F, %252F, ...
        decoded = urllib.parse.unquote(text)
        if decoded == text:
            break
        forms.append(decoded)
        text = decoded
    for form in forms + [unicodedata.normalize("NFKC", f) for f in forms]:
        if any(c in _SEPARATOR_LOOKALIKES for c in form):
            return f"must not contain path separators (plain, URL-encoded or look-alike), got {rid[:80]!r}"
        if form in (".", "..") or "\x00" in form:
            return f"must not be a path (dot segment or NUL), got {rid[:80]!r}"
    return None


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def begin_row(raw: dict[str, Any], spec: JobSpec) -> tuple[Callable[[str], Any], list[tuple[str, str]], dict[str, Any]]:
    """Start checking one row: ``take(field)`` (the row's value, or the spec's default where null), the
    list of problems (the ``id`` checked first) and the effective values so far (``{"id": ...}``)."""
    d = spec.defaults
    problems: list[tuple[str, str]] = []

    def take(field: str) -> Any:
        v = raw.get(field)  # null takes the default; NaN is a value and is reported where the field is checked
        return getattr(d, field) if v is None else v

    rid = raw.get("id")
    id_problem = check_id(rid)
    if id_problem:
        problems.append(("id", id_problem))
    return take, problems, {"id": rid}


def check_numbers(take: Any, ranges: list[tuple[str, int, int]], problems: list[tuple[str, str]],
                  out: dict[str, Any], max_guidance: float = float("inf")) -> None:
    """Check ``guidance_scale`` (finite, > 0, at most ``max_guidance``: ``limits.max_guidance_scale``) and the
    integer fields ``(field, lo, hi)`` (height and width also multiples of 8) of one row; ``take(field)``
    gives the row's value or the default."""
    g = take("guidance_scale")
    if not _is_number(g) or not math.isfinite(g) or g <= 0:
        problems.append(("guidance_scale", f"must be a finite number > 0, got {g!r}"))
    elif g > max_guidance:
        problems.append(("guidance_scale", f"must be at most limits.max_guidance_scale={max_guidance:g}, got {g!r}"))
    out["guidance_scale"] = float(g) if _is_number(g) else None
    for field, lo, hi in ranges:
        v = take(field)
        if not _is_int(v):
            if isinstance(v, float) and math.isfinite(v) and v.is_integer():
                v = int(v)  # a float column holding whole numbers is fine
            else:
                problems.append((field, f"must be an integer, got {v!r}"))
                out[field] = None
                continue
        if not lo <= v <= hi:
            problems.append((field, f"must be in [{lo}, {hi}], got {v}"))
        elif field in ("height", "width") and v % 8:
            problems.append((field, f"must be a multiple of 8, got {v}"))
        out[field] = v


def check_scheduler_and_seed(raw: dict[str, Any], take: Any, spec: JobSpec, problems: list[tuple[str, str]],
                             out: dict[str, Any]) -> None:
    """Check the row's scheduler name and seed; a missing seed is derived from the run seed and the id
    (``batch.plan.seeds``), so ``out["id"]`` must be set first."""
    sched = take("scheduler")
    if sched not in ("model",) + SCHEDULER_NAMES:
        problems.append(("scheduler", f"must be one of {['model', *SCHEDULER_NAMES]}, got {sched!r}"))
    out["scheduler"] = sched

    rid, seed = out["id"], raw.get("seed")
    if seed is None:
        out["seed_source"] = "derived"
        out["row_seed"] = derive_row_seed(effective_run_seed(spec), rid) if isinstance(rid, str) else None
    elif _is_int(seed) and 0 <= seed < MAX_SEED:
        out["seed_source"], out["row_seed"] = "manifest", seed
    elif isinstance(seed, float) and seed.is_integer() and 0 <= seed < 2**53:  # a float column, exact
        out["seed_source"], out["row_seed"] = "manifest", int(seed)
    else:
        problems.append(("seed", f"must be an integer in [0, 2**63) (whole floats below 2**53 accepted), got {seed!r}"))
        out["seed_source"], out["row_seed"] = "manifest", None


def bucket_key(item: dict[str, Any]) -> tuple:
    """Items with equal keys can share one sampler call (same shape, steps, guidance and scheduler)."""
    return tuple(item[f] for f in BUCKET_FIELDS)


def finish_row(raw: dict[str, Any], take: Callable[[str], Any], spec: "JobSpec", problems: list[tuple[str, str]],
               out: dict[str, Any], ranges: list[tuple[str, int, int]]) -> dict[str, Any]:
    """The checks every task ends a row with: guidance and the integer ``ranges`` (:func:`check_numbers`),
    then scheduler and seed (:func:`check_scheduler_and_seed`); ``out`` when the row is good, else
    :class:`RowError` with every problem found."""
    check_numbers(take, ranges, problems, out, spec.limits.max_guidance_scale)
    check_scheduler_and_seed(raw, take, spec, problems, out)
    if problems:
        raise RowError(problems)
    return out
