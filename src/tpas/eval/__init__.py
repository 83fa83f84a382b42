"""Evaluation: retrieval metrics, metric tables, the evaluation pipeline and its HTML report."""

from tpas.eval.metrics import Metrics, evaluate, evaluate_rankings, positive_ranks
from tpas.eval.run import EvalResult, run_eval
from tpas.eval.tables import FIGURES, by_group, html_table, markdown_table

__all__ = [
    "FIGURES",
    "EvalResult",
    "Metrics",
    "by_group",
    "evaluate",
    "evaluate_rankings",
    "html_table",
    "markdown_table",
    "positive_ranks",
    "run_eval",
]
