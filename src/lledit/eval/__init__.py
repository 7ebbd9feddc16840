"""Evaluation: metrics, the lifelong protocol, and reports."""

from lledit.eval.lifelong import LifelongResult, run_lifelong
from lledit.eval.metrics import METRICS, evaluate, locality_reference
from lledit.eval.report import console_table, markdown_table, plot_curves
from lledit.eval.scoring import PairScores, score_pairs

__all__ = [
    "METRICS",
    "LifelongResult",
    "PairScores",
    "console_table",
    "evaluate",
    "locality_reference",
    "markdown_table",
    "plot_curves",
    "run_lifelong",
    "score_pairs",
]
