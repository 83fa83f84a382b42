"""A self-contained HTML retrieval report: for sampled queries, the text and its top-10 images.

Like the retrieval figure of the PAB paper: a green frame marks a true match, a red one a wrong
image. Under each thumbnail: its rank and the score that decided that rank, so the numbers read in
rank order; after query-set post-processing that is the post-processed score, an image SCA (or the
one-to-one assignment) moved to the top is marked as such, and the similarity (fused ITM+ITC or
ITC) is shown below. A true match ranked below the top 10 follows the row with its rank.
Thumbnails are small JPEGs embedded as base64, so the one file can be mailed or attached to a CI
run without the dataset next to it.
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
    """One sampled query: its index in the eval set, and the gallery rows of its top results in rank
    order with their similarity (``scores``) and, after post-processing, the value that ordered them
    (``order_scores``; None = the similarity did)."""

    query: int
    gallery_rows: Sequence[int]
    scores: Sequence[float]
    positive_rank: int | None = None  # rank of its first true match in the full ranking, if known
    extra: dict = field(default_factory=dict)
    order_scores: Sequence[float] | None = None
    positive_row: int | None = None  # gallery row of that true match
    positive_score: float | None = None  # its similarity


POST_NAMES = {"sca": "SCA", "one_to_one": "one-to-one", "dual_softmax": "dual-softmax"}


def _score_lines(r: ReportRow, k: int, post: str) -> tuple[str, str]:
    """(what decided rank ``k+1``, a second line or ""): the similarity without post-processing;
    else the post-processed score, or the method's name for an image it lifted above every
    similarity (SCA's and one-to-one's picks), with the similarity underneath when it differs."""
    similarity = float(r.scores[k])
    if r.order_scores is None or post == "none":
        return f"{similarity:.3f}", ""
    order = float(r.order_scores[k])
    if order > max(float(x) for x in r.scores) + 1e-6:
        return f"{POST_NAMES.get(post, post)} pick", f"sim {similarity:.3f}"
    return f"{order:.3f}", "" if abs(order - similarity) < 1e-6 else f"sim {similarity:.3f}"


class Thumbnails:
    """base64 JPEG thumbnails of gallery images, each made once."""

    def __init__(self, evalset: EvalSet, height: int = 96, quality: int = 80):
        self.evalset, self.height, self.quality = evalset, height, quality
        self._cache: dict[int, str] = {}

    def __call__(self, row: int) -> str:
        if row not in self._cache:
            from tpas.data.transforms import UnreadableImage, load_image

            path = self.evalset.image_path(self.evalset.gallery[row].image)
            try:
                image = load_image(path)
            except UnreadableImage as exc:  # skipped while encoding (--on-bad-image skip): a grey frame here
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
.c .s{color:#666}.gap{align-self:center;font-size:1.4em;color:#999;padding:0 .3em}
"""


def _cell(evalset: EvalSet, thumbs: Thumbnails, target: str | None, g_row: int, rank: int, decided: str,
          second: str) -> str:
    item = evalset.gallery[int(g_row)]
    state = "" if target is None else ("hit" if item.target == target else "miss")
    src = thumbs(int(g_row))
    img = f'<img src="{src}" alt="{html.escape(item.image_id)}">' if src else '<div class="ph"></div>'
    below = f'<div class="s">{html.escape(second)}</div>' if second else ""
    return (f'<div class="c {state}" title="{html.escape(item.image)}">{img}<div>#{rank} {html.escape(decided)}</div>'
            f'{below}<div class="id">{html.escape(item.image_id)}</div></div>')


def write_report(path: str | Path, evalset: EvalSet, rows: Sequence[ReportRow], *, title: str = "tpas retrieval report",
                 metrics: Metrics | None = None, settings: dict | None = None, thumb_height: int = 96) -> Path:
    """Write the report to ``path`` (atomically) and return it.

    A thumbnail is outlined green when its gallery image's target equals the query's target, red
    otherwise; with hidden ground truth (challenge set) frames stay grey.
    """
    thumbs = Thumbnails(evalset, height=thumb_height)
    post = str((settings or {}).get("post", "none"))
    blocks = []
    for r in rows:
        query = evalset.queries[r.query]
        cells = [_cell(evalset, thumbs, query.target, g_row, k + 1, *_score_lines(r, k, post))
                 for k, g_row in enumerate(r.gallery_rows)]
        shown = {int(g) for g in r.gallery_rows}
        if r.positive_row is not None and r.positive_rank is not None and int(r.positive_row) not in shown:
            score = "" if r.positive_score is None else f"sim {r.positive_score:.3f}"
            cells.append('<div class="gap">…</div>' + _cell(evalset, thumbs, query.target, r.positive_row,
                                                              r.positive_rank, "true match", score))
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
Green frame = true match, red = wrong image. Under each image: its rank and the score that decided it
(fused ITM+ITC when re-ranked, else ITC; after query-set post-processing the post-processed score, or
"SCA pick" for an image SCA moved to the top, with the similarity below). A true match ranked below the
top 10 follows the row, after "…", with its rank.</p>
{html_table(by_group(metrics), ('n', *FIGURES), first='queries') if metrics is not None else ''}
<ul>{facts}</ul>
{''.join(blocks)}
</body></html>
"""
    path = Path(path)
    write_text(path, page)
    return path
