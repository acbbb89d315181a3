"""What people look at: the results table (Markdown) and the Pareto plot (FID vs CLIP score)."""

from __future__ import annotations

import io
import math

import numpy as np
import pyarrow as pa


def _fmt(v: float | None, digits: int = 2) -> str:
    return "n/a" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:.{digits}f}"


def markdown_table(results: pa.Table) -> str:
    """The results as a Markdown table (FID and CLIP score with their 95% intervals)."""
    lines = ["| model | guidance | n | FID | FID 95% CI | CLIP score | CLIP 95% CI |",
             "|---|---:|---:|---:|---|---:|---|"]
    for r in results.to_pylist():
        lines.append(f"| {r['model']} | {r['guidance_scale']:g} | {r['n']} | {_fmt(r['fid'])} | "
                     f"[{_fmt(r['fid_lo'])}, {_fmt(r['fid_hi'])}] | {_fmt(r['clip_score'], 3)} | "
                     f"[{_fmt(r['clip_lo'], 3)}, {_fmt(r['clip_hi'], 3)}] |")
    return "\n".join(lines) + "\n"


def _half(hi: float | None, lo: float | None) -> float:
    """A non-negative error-bar half-width; 0 where an interval end is missing (no bootstrap)."""
    if hi is None or lo is None or math.isnan(hi) or math.isnan(lo):
        return 0.0
    return max(0.0, hi - lo)


def pareto_plot(results: pa.Table, title: str = "") -> bytes:
    """PNG bytes: FID (y) against CLIP score (x), one curve per model, each point labelled by its scale,
    95% bootstrap intervals as error bars (the layout of the SD model cards' evaluation plot)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 5), dpi=120)
    rows = [r for r in results.to_pylist() if r["fid"] is not None and r["clip_score"] is not None]
    for name in dict.fromkeys(r["model"] for r in rows):
        pts = sorted((r for r in rows if r["model"] == name), key=lambda r: r["guidance_scale"])
        x = np.array([r["clip_score"] for r in pts])
        y = np.array([r["fid"] for r in pts])
        xerr = np.array([[_half(r["clip_score"], r["clip_lo"]), _half(r["clip_hi"], r["clip_score"])] for r in pts]).T
        yerr = np.array([[_half(r["fid"], r["fid_lo"]), _half(r["fid_hi"], r["fid"])] for r in pts]).T
        line = ax.errorbar(x, y, xerr=xerr, yerr=yerr, marker="o", capsize=2, label=name)
        for r in pts:
            ax.annotate(f"{r['guidance_scale']:g}", (r["clip_score"], r["fid"]), textcoords="offset points",
                        xytext=(4, 4), fontsize=8, color=line[0].get_color())
    ax.set_xlabel("CLIP score (100 x cosine)")
    ax.set_ylabel("FID (lower is better)")
    ax.set_title(title or "FID vs CLIP score by guidance scale")
    ax.grid(alpha=0.3)
    if rows:
        ax.legend()
    buf = io.BytesIO()
    fig.tight_layout()
    fig.savefig(buf, format="png")
    plt.close(fig)
    return buf.getvalue()
