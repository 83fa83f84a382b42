"""Metric tables: one renderer for markdown and one for HTML, for every table tpas prints or writes.

A table is a list of labelled :class:`~tpas.eval.metrics.Metrics` (one row each: a setting of an
ablation, or "all" / "normal" / "anomaly" of one evaluation) and a list of column names:

* ``"R@1"``, ``"R@5"``, ..., ``"mAP"``, ``"mINP"``: the row's figure;
* ``"n"``: the row's number of queries;
* ``"anomaly R@1"`` (a group name, a space, a figure): that figure of the row's query group.

A figure a row does not have is shown as ``–``. JSON needs no renderer: ``Metrics.to_dict``.
"""

from __future__ import annotations

import html
from collections.abc import Sequence

from tpas.eval.metrics import Metrics

__all__ = ["FIGURES", "by_group", "cell", "html_table", "markdown_table"]

FIGURES = ("R@1", "R@5", "R@10", "mAP", "mINP")  # the headline columns, in the order every table uses

Row = tuple[str, Metrics]


def by_group(metrics: Metrics, label: str = "all") -> list[Row]:
    """Rows for one evaluation: all queries, then each query group (normal, anomaly, ...)."""
    return [(label, metrics), *metrics.groups.items()]


def cell(metrics: Metrics, column: str) -> str:
    """The text of one cell (two decimals; ``–`` when the row has no such figure)."""
    if column == "n":
        return str(metrics.num_queries)
    group, _, figure = column.rpartition(" ")
    if group:
        metrics = metrics.groups.get(group)
        if metrics is None:
            return "–"
    try:
        return f"{metrics[figure]:.2f}"
    except KeyError:
        return "–"


def markdown_table(rows: Sequence[Row], columns: Sequence[str] = FIGURES, first: str = "setting") -> str:
    """A markdown table; numbers right-aligned."""
    lines = ["| " + " | ".join([first, *columns]) + " |", "|---|" + "---:|" * len(columns)]
    lines += ["| " + " | ".join([label, *(cell(m, c) for c in columns)]) + " |" for label, m in rows]
    return "\n".join(lines) + "\n"


def html_table(rows: Sequence[Row], columns: Sequence[str] = FIGURES, first: str = "setting",
               links: Sequence[str | None] | None = None) -> str:
    """An HTML ``<table class="m">``; ``links`` (one href or None per row) adds an "examples" column."""
    head = "".join(f"<th>{html.escape(c)}</th>" for c in (first, *columns))
    if links is not None:
        head += "<th></th>"
    body = []
    for i, (label, m) in enumerate(rows):
        cells = "".join(f"<td>{html.escape(cell(m, c))}</td>" for c in columns)
        if links is not None:
            href = links[i]
            cells += f'<td><a href="{html.escape(href)}">examples</a></td>' if href else "<td></td>"
        body.append(f"<tr><th>{html.escape(label)}</th>{cells}</tr>")
    return f'<table class="m"><thead><tr>{head}</tr></thead><tbody>{"".join(body)}</tbody></table>'
