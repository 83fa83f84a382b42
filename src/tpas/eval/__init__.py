"""Evaluation: retrieval metrics over score matrices (and, later, HTML reports)."""

from tpas.eval.metrics import evaluate, evaluate_rankings, format_table, positive_ranks

__all__ = ["evaluate", "evaluate_rankings", "format_table", "positive_ranks"]
