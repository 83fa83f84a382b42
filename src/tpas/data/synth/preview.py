"""Contact sheet: the first training images of a mini-PAB set with their labels and captions."""

from __future__ import annotations

import json
import textwrap
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont

from tpas.utils.io import atomic_save


def _font(size: int):
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow without FreeType sizing
        return ImageFont.load_default()


def contact_sheet(root: str | Path, path: str | Path, count: int = 24, columns: int = 4) -> Path:
    """Write ``count`` training images (normal then anomalous of each identity) with captions."""
    root, path = Path(root), Path(path)
    rows = []
    for ann in sorted((root / "annotation" / "train").glob("pair_*.json"), key=lambda p: int(p.stem.split("_")[1])):
        with open(ann, encoding="utf-8") as fh:
            rows.extend(json.loads(line) for line in fh if line.strip())
        if len(rows) >= count:
            break
    rows = rows[:count]
    if not rows:
        raise FileNotFoundError(f"{root}: no training images to preview")
    first = Image.open(root / rows[0]["image"])
    w, h = first.size
    text_w = max(220, w * 2)
    cell_w, cell_h = w + text_w + 12, h + 8
    n_rows = (len(rows) + columns - 1) // columns
    sheet = Image.new("RGB", (cell_w * columns, cell_h * n_rows), (250, 250, 248))
    draw = ImageDraw.Draw(sheet)
    head, body = _font(13), _font(11)
    chars = max(20, int(text_w / 6.2))
    for k, row in enumerate(rows):
        x, y = (k % columns) * cell_w + 4, (k // columns) * cell_h + 4
        with Image.open(root / row["image"]) as img:
            sheet.paste(img.convert("RGB"), (x, y))
        normal = "normal" in row
        label = f"{'NORMAL' if normal else 'ANOMALY'}: {row.get('normal') or row.get('anomaly')}"
        tx = x + w + 6
        draw.text((tx, y), label, fill=(20, 120, 40) if normal else (190, 30, 30), font=head)
        draw.text((tx, y + 18), f"{row['image_id']}  |  {row.get('scene', '')}", fill=(110, 110, 110), font=body)
        lines = textwrap.wrap(row["caption"], chars)
        draw.multiline_text((tx, y + 36), "\n".join(lines), fill=(30, 30, 30), font=body, spacing=3)
    atomic_save(path, lambda tmp: sheet.save(tmp, format="PNG"))
    return path
