"""Evaluation: retrieval metrics, metric tables, the evaluation pipeline (one system or a fusion), its HTML report."""

from tpas.eval.fusion import run_fusion
from tpas.eval.metrics import Metrics, evaluate, evaluate_rankings, positive_ranks
from tpas.eval.run import EvalResult, check_one_to_one, run_eval
from tpas.eval.tables import FIGURES, by_group, html_table, markdown_table

__all__ = [
    "FIGURES",
    "EvalResult",
    "Metrics",
    "by_group",
    "check_one_to_one",
    "evaluate",
    "evaluate_rankings",
    "html_table",
    "markdown_table",
    "positive_ranks",
    "run_eval",
    "run_fusion",
]
