"""A self-contained HTML retrieval report: for sampled queries, the text and its top-10 images.

Like the retrieval figure of the PAB paper: a green frame marks a true match, a red one a wrong
image, the score sits under each thumbnail. Thumbnails are small JPEGs embedded as base64, so
the one file can be mailed or attached to a CI run without the dataset next to it.
"""

from __future__ import annotations

import base64
import html
import io
import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from tpas.data.records import EvalSet
from tpas.eval.metrics import Metrics
from tpas.eval.tables import FIGURES, by_group, html_table
from tpas.utils.io import write_text

log = logging.getLogger(__name__)

__all__ = ["ReportRow", "write_report"]


@dataclass
class ReportRow:
    """One sampled query: its index in the eval set, gallery rows and scores of its top results."""

    query: int
    gallery_rows: Sequence[int]
    scores: Sequence[float]
    positive_rank: int | None = None  # rank of its first true match in the full ranking, if known
    extra: dict = field(default_factory=dict)


class Thumbnails:
    """base64 JPEG thumbnails of gallery images, each made once."""

    def __init__(self, evalset: EvalSet, height: int = 96, quality: int = 80):
        self.evalset, self.height, self.quality = evalset, height, quality
        self._cache: dict[int, str] = {}

    def __call__(self, row: int) -> str:
        if row not in self._cache:
            from tpas.data.transforms import load_image

            path = self.evalset.image_path(self.evalset.gallery[row].image)
            try:
                image = load_image(path)
            except (FileNotFoundError, OSError) as exc:
                log.warning("report: no thumbnail for %s (%s)", path, exc)
                self._cache[row] = ""
                return ""
            width = max(1, round(image.width * self.height / max(1, image.height)))
            image = image.resize((width, self.height))
            buf = io.BytesIO()
            image.save(buf, format="JPEG", quality=self.quality)
            self._cache[row] = "data:image/jpeg;base64," + base64.b64encode(buf.getvalue()).decode("ascii")
        return self._cache[row]


STYLE = """
body{font-family:system-ui,sans-serif;margin:1.5em;color:#222}
table.m{border-collapse:collapse;margin:.5em 0}table.m td,table.m th{border:1px solid #ccc;padding:.2em .6em;text-align:right}
.q{margin:1.2em 0;padding-top:.6em;border-top:1px solid #ddd}.q .t{font-size:1.05em;margin-bottom:.3em}
.tag{display:inline-block;font-size:.8em;padding:0 .4em;border-radius:3px;background:#eee;margin-left:.4em}
.tag.anomaly{background:#fde2c8}.tag.normal{background:#d8eefe}
.row{display:flex;gap:6px;flex-wrap:wrap}.c{text-align:center;font-size:.75em}
.c img,.c .ph{display:block;border:4px solid #999;height:var(--h);min-width:30px}
.c.hit img,.c.hit .ph{border-color:#1a9c3a}.c.miss img,.c.miss .ph{border-color:#d0312d}
.c .id{color:#666;max-width:9em;overflow:hidden;text-overflow:ellipsis;white-space:nowrap}
"""


def write_report(path: str | Path, evalset: EvalSet, rows: Sequence[ReportRow], *, title: str = "tpas retrieval report",
                 metrics: Metrics | None = None, settings: dict | None = None, thumb_height: int = 96) -> Path:
    """Write the report to ``path`` (atomically) and return it.

    A thumbnail is outlined green when its gallery image's target equals the query's target, red
    otherwise; with hidden ground truth (challenge set) frames stay grey.
    """
    thumbs = Thumbnails(evalset, height=thumb_height)
    blocks = []
    for r in rows:
        query = evalset.queries[r.query]
        cells = []
        for rank, (g_row, score) in enumerate(zip(r.gallery_rows, r.scores), 1):
            item = evalset.gallery[int(g_row)]
            state = "" if query.target is None else ("hit" if item.target == query.target else "miss")
            src = thumbs(int(g_row))
            img = f'<img src="{src}" alt="{html.escape(item.image_id)}">' if src else '<div class="ph"></div>'
            cells.append(f'<div class="c {state}" title="{html.escape(item.image)}">{img}'
                         f'<div>#{rank} {score:.3f}</div><div class="id">{html.escape(item.image_id)}</div></div>')
        behaviour = query.behaviour.value
        tag = f'<span class="tag {behaviour}">{behaviour}</span>' if behaviour != "unknown" else ""
        found = ""
        if r.positive_rank is not None:
            found = f'<span class="tag">true match at rank {r.positive_rank}</span>'
        blocks.append(f'<div class="q"><div class="t"><b>{html.escape(query.query_id)}</b>: '
                      f'{html.escape(query.caption)}{tag}{found}</div><div class="row">{"".join(cells)}</div></div>')
    facts = "".join(f"<li>{html.escape(str(k))}: {html.escape(str(v))}</li>" for k, v in (settings or {}).items())
    page = f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>{html.escape(title)}</title>
<style>{STYLE}</style><style>:root{{--h:{int(thumb_height)}px}}</style></head><body>
<h1>{html.escape(title)}</h1>
<p>{html.escape(evalset.name)}: {len(evalset.queries)} queries, {len(evalset.gallery)} gallery images.
Green frame = true match, red = wrong image; the number under each image is its score (fused ITM+ITC
when re-ranked, else ITC; query-set post-processing changes the order, not these numbers).</p>
{html_table(by_group(metrics), ('n', *FIGURES), first='queries') if metrics is not None else ''}
<ul>{facts}</ul>
{''.join(blocks)}
</body></html>
"""
    path = Path(path)
    write_text(path, page)
    return path
