"""Contact sheets: ``sdbatch grid OUTPUT --n 64 --out grid.png``, a PNG of a run's images with captions.

1. read the run's committed metadata; keep images with ``status == ok``, ordered by (id, image_index);
2. take the first ``n``; lay them out ``columns`` wide (default: a near-square grid);
3. each cell: the image scaled (bicubic) to fit ``cell x cell`` at the cell's top-left, then a caption band:
   id and image index, seed (and ``NSFW`` when the checker flagged it), the prompt cut to the cell width;
4. write the sheet as PNG to ``out`` (any fsspec URI).

Images are read from whatever the run's format is (files, WebDataset or Parquet shards), by
:class:`batch.store.formats.ImageReader`.
"""

from __future__ import annotations

import io
import math
from dataclasses import dataclass
from typing import Any

import fsspec
import pyarrow as pa
import pyarrow.compute as pc
from PIL import Image, ImageDraw, ImageFont

from batch.store.commit import read_metadata
from batch.store.formats import ImageReader
from batch.store.schema import DONE_STATUSES

CAPTION_LINES = 3
LINE_HEIGHT = 12
PAD = 2
BACKGROUND = (255, 255, 255)
TEXT = (0, 0, 0)


@dataclass(frozen=True)
class Layout:
    """Geometry of a contact sheet."""

    count: int
    columns: int
    cell: int

    @property
    def rows(self) -> int:
        return math.ceil(self.count / self.columns) if self.count else 0

    @property
    def cell_height(self) -> int:
        return self.cell + CAPTION_LINES * LINE_HEIGHT + 2 * PAD

    @property
    def size(self) -> tuple[int, int]:
        """(width, height) of the sheet in pixels."""
        return self.columns * self.cell, max(1, self.rows) * self.cell_height

    @classmethod
    def square(cls, count: int, cell: int, columns: int | None = None) -> "Layout":
        """``count`` cells, ``columns`` wide (default: the smallest square that holds them)."""
        return cls(count, columns or max(1, math.ceil(math.sqrt(count))), cell)

    def origin(self, i: int) -> tuple[int, int]:
        """Top-left corner of cell ``i`` (row-major)."""
        return (i % self.columns) * self.cell, (i // self.columns) * self.cell_height


def fit(image: Image.Image, cell: int) -> Image.Image:
    """Scale ``image`` (bicubic) so its longer side is ``cell`` pixels."""
    scale = cell / max(image.size)
    size = (max(1, round(image.width * scale)), max(1, round(image.height * scale)))
    return image if size == image.size else image.resize(size, Image.BICUBIC)


def _clip_text(draw: ImageDraw.ImageDraw, text: str, font, width: int) -> str:
    text = " ".join(str(text).split())
    if draw.textlength(text, font=font) <= width:
        return text
    while text and draw.textlength(text + "...", font=font) > width:
        text = text[:-1]
    return text + "..."


def captions(row: dict) -> list[str]:
    """The caption lines of a metadata row: id #k, seed (+ NSFW), prompt."""
    seed = f"seed {row.get('seed')}" + ("  NSFW" if row.get("nsfw") else "")
    return [f"{row.get('id')} #{row.get('image_index')}", seed, row.get("prompt") or ""]


def contact_sheet(rows: list[dict], reader: ImageReader, cell: int = 128, columns: int | None = None) -> Image.Image:
    """Render ``rows`` (metadata rows of stored images) as a captioned grid."""
    layout = Layout.square(len(rows), cell, columns)
    sheet = Image.new("RGB", layout.size, BACKGROUND)
    draw = ImageDraw.Draw(sheet)
    font = ImageFont.load_default()
    for i, row in enumerate(rows):
        x, y = layout.origin(i)
        sheet.paste(fit(Image.fromarray(reader.read(row)), cell), (x, y))
        for j, line in enumerate(captions(row)):
            draw.text((x + PAD, y + cell + PAD + j * LINE_HEIGHT), _clip_text(draw, line, font, cell - 2 * PAD),
                      fill=TEXT, font=font)
    return sheet


def select_rows(output: str, n: int, storage_options: dict[str, Any] | None = None) -> list[dict]:
    """The first ``n`` stored images of a run, ordered by (id, image_index)."""
    meta = read_metadata(output, storage_options)  # filtered and sorted in Arrow: only n rows become dicts
    # skipped rows (dedup_against) are images too: their uri is the earlier run's image
    ok = meta.filter(pc.and_(pc.is_in(meta.column("status"), pa.array(DONE_STATUSES)),
                             pc.not_equal(pc.fill_null(meta.column("uri"), ""), "")))
    ok = ok.take(pc.sort_indices(ok, [("id", "ascending"), ("image_index", "ascending")]))
    return ok.slice(0, n).to_pylist()


def make_grid(output: str, out: str, n: int = 64, cell: int = 128, columns: int | None = None,
              storage_options: dict[str, Any] | None = None) -> tuple[Layout, list[dict]]:
    """Write the contact sheet of run ``output`` to ``out``; return its layout and the rows shown."""
    if n < 1 or cell < 8:
        raise ValueError("n must be >= 1 and cell >= 8")
    rows = select_rows(output, n, storage_options)
    if not rows:
        raise ValueError(f"{output}: no stored images (no committed metadata rows with status ok)")
    sheet = contact_sheet(rows, ImageReader(storage_options), cell, columns)
    buf = io.BytesIO()
    sheet.save(buf, format="PNG")
    with fsspec.open(out, "wb", **(storage_options or {}) if "://" in out else {}) as f:
        f.write(buf.getvalue())
    return Layout.square(len(rows), cell, columns), rows
