"""What people look at: the results table (Markdown), the comparability record as text, and the Pareto plot
(FID vs CLIP score, and KID vs CLIP score when KID was computed)."""

from __future__ import annotations

import io
import math
from typing import Any

import numpy as np
import pyarrow as pa


def _fmt(v: float | None, digits: int = 2, scale: float = 1.0) -> str:
    return "n/a" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v * scale:.{digits}f}"


def markdown_table(results: pa.Table) -> str:
    """The results as a Markdown table: n, FID with its 95% jackknife interval, KID (x 10^3) +- its std over
    subsets, CLIP score with its 95% bootstrap interval."""
    lines = ["| model | guidance | n | FID | FID 95% CI | KID x1e3 | CLIP score | CLIP 95% CI |",
             "|---|---:|---:|---:|---|---:|---:|---|"]
    for r in results.to_pylist():
        kid = "n/a" if r.get("kid") is None else f"{_fmt(r['kid'], 3, 1e3)} ± {_fmt(r.get('kid_std'), 3, 1e3)}"
        lines.append(f"| {r['model']} | {r['guidance_scale']:g} | {r['n']} | {_fmt(r['fid'])} | "
                     f"[{_fmt(r['fid_lo'])}, {_fmt(r['fid_hi'])}] | {kid} | {_fmt(r['clip_score'], 3)} | "
                     f"[{_fmt(r['clip_lo'], 3)}, {_fmt(r['clip_hi'], 3)}] |")
    return "\n".join(lines) + "\n"


def comparability_markdown(comp: dict[str, Any]) -> str:
    """The comparability record (``batch.eval.evaluation.comparability``) as a Markdown list under the table."""
    ref, clip, gen = comp["reference"], comp["clip"], comp["generation"]
    models = "; ".join(f"{k}: {v['model']} ({v['scheduler']}, {v['dtype']}"
                       f"{', revision ' + v['revision'] if v.get('revision') else ''})"
                       for k, v in gen["models"].items())
    lines = [
        "Comparable only with results that share every line below.",
        "",
        f"- N generated per point: {comp['n_generated_per_point']} (column n: images with features)",
        f"- reference set: {ref['name']} ({ref['n']} images used of {ref['files']}; {ref['preprocessing']}; "
        f"statistics key `{ref['key']}`)",
        f"- resize into Inception: `{comp['resize']}` ({comp['resize_detail']})",
        f"- Inception weights: sha256 `{comp['inception_weights_sha256']}`",
        f"- FID interval: {comp['fid_interval']}",
        f"- KID: {comp['kid']['estimator']}, {comp['kid']['subsets']} subsets of {comp['kid']['subset_size']}; "
        f"± is the {comp['kid']['std']}",
        f"- CLIP: {clip['model']} (revision {clip['revision']}); {clip['aggregation']}; {clip['truncation']}; "
        f"interval: {clip['interval']}",
        f"- generation: {gen['steps']} steps, {gen['width']}x{gen['height']}, seed {gen['seed']}; {models}",
    ]
    return "\n".join(lines) + "\n"


def comparability_caption(comp: dict[str, Any]) -> str:
    """A compact caption for the plot: N, reference, resize, weights, CLIP rule, generation settings."""
    ref, gen = comp["reference"], comp["generation"]
    sched = ", ".join(sorted({f"{v['scheduler']} {v['dtype']}" for v in gen["models"].values()}))
    name = ref["name"].rstrip("/").rsplit("/", 1)[-1] or ref["name"]
    return (f"N={comp['n_generated_per_point']} per point vs reference '{name}' (n={ref['n']}, centre crop + "
            f"bicubic); resize {comp['resize']}; Inception sha256 {comp['inception_weights_sha256'][:12]}; "
            f"{gen['steps']} steps {sched}\n"
            f"CLIP {comp['clip']['model']} (per-image clamp, then mean); FID bars: 95% jackknife CI of E[FID_N] "
            f"(this N and reference); KID bars: ± std over {comp['kid']['subsets']} subsets")


def interval_segments(points: list[dict], lo: str, hi: str, scale: float = 1.0) -> tuple[list[int], list, list]:
    """(indices, lower ends, upper ends) of the points whose interval has both ends: the bars are drawn from
    the interval's own ends (asymmetric where it is; an interval that excluded its point would show so)."""
    idx, lows, highs = [], [], []
    for i, r in enumerate(points):
        a, b = r.get(lo), r.get(hi)
        if a is None or b is None or math.isnan(a) or math.isnan(b):
            continue
        idx.append(i)
        lows.append(a * scale)
        highs.append(b * scale)
    return idx, lows, highs


def _label_offsets(n: int, curve: int = 0) -> list[tuple[int, int]]:
    """Offsets (points) for n successive labels along curve number ``curve``: neighbours alternate above and
    below the curve, and each curve starts on a different side, so labels of close points do not overlap."""
    cycle = [(6, 6), (6, -12), (-18, 6), (-18, -12)]
    return [cycle[(i + 2 * curve + (curve // 2)) % len(cycle)] for i in range(n)]


def pareto_plot(results: pa.Table, title: str = "", caption: str = "") -> bytes:
    """PNG bytes: FID (y) against CLIP score (x), one curve per model, every point labelled with its guidance
    scale; error bars are the actual interval ends (asymmetric where the interval is): FID's jackknife interval
    and CLIP's bootstrap interval. With KID in the results a second panel shows KID (x 10^3, +- std over
    subsets) against CLIP score. ``caption``: the comparability line(s) printed under the axes."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in results.to_pylist() if r["fid"] is not None and r["clip_score"] is not None]
    with_kid = any(r.get("kid") is not None for r in rows)
    fig, axes = plt.subplots(1, 2 if with_kid else 1, figsize=(13 if with_kid else 7.5, 5.6), dpi=120,
                             squeeze=False)
    panels = [("fid", "fid_lo", "fid_hi", 1.0, "FID (lower is better)")]
    if with_kid:
        panels.append(("kid", "kid_lo", "kid_hi", 1e3, "KID x 10^3 (lower is better)"))
    for ax, (key, lo, hi, scale, ylabel) in zip(axes[0], panels):
        for ci, name in enumerate(dict.fromkeys(r["model"] for r in rows)):
            pts = sorted((r for r in rows if r["model"] == name and r.get(key) is not None),
                         key=lambda r: r["guidance_scale"])
            if not pts:
                continue
            if key == "kid":  # mean +- std over subsets
                pts = [dict(r, kid_lo=r["kid"] - (r["kid_std"] or 0.0), kid_hi=r["kid"] + (r["kid_std"] or 0.0))
                       for r in pts]
            x = np.array([r["clip_score"] for r in pts])
            y = np.array([r[key] for r in pts]) * scale
            line = ax.plot(x, y, marker="o", label=name)
            color = line[0].get_color()
            i, a, b = interval_segments(pts, lo, hi, scale)
            ax.vlines(x[i], a, b, color=color, linewidth=1.2)
            i, a, b = interval_segments(pts, "clip_lo", "clip_hi")
            ax.hlines(y[i], a, b, color=color, linewidth=1.2)
            for r, xy, off in zip(pts, zip(x, y), _label_offsets(len(pts), ci)):
                ax.annotate(f"{r['guidance_scale']:g}", xy, textcoords="offset points", xytext=off, fontsize=8,
                            color=color)
        ax.set_xlabel("CLIP score (100 x cosine, per-image clamp at 0, mean)")
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
        if rows:
            ax.legend(title="model (labels: guidance scale)", fontsize=8, title_fontsize=8)
    fig.suptitle(title or "FID vs CLIP score by guidance scale")
    if caption:
        fig.text(0.01, 0.01, caption, fontsize=7, va="bottom", ha="left", wrap=True)
    fig.tight_layout(rect=(0, 0.08 if caption else 0, 1, 1))
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    plt.close(fig)
    return buf.getvalue()
