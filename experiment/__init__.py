"""moekit.experiment: sparse vs dense at matched compute, for every task, on one layer.

``plan.py`` (CompareConfig, the planner, the TASKS registry), ``runner.py`` (training side by side, resume,
result files), ``report.py`` (summary.json, report.md) and ``plots.py``, ``matching.py`` (dense twins),
``verdict.py`` (paired-seed verdicts with t-intervals), ``scaling.py`` (the scaling recipe: planning, fit,
dense-equivalent compute multipliers). A task is one ``TaskAdapter`` file: ``lm.py`` (Shakespeare) and
``multimodal.py`` (digit tasks through one decoder).
"""

from moekit.experiment.adapter import RunSpec, TaskAdapter
from moekit.experiment.matching import MatchReport, check_matched, dense_twin, describe, param_matched_twin
from moekit.experiment.plan import TASKS, CompareConfig, Comparison, load_comparison, matching_table, plan_runs
from moekit.experiment.report import headline, write_report
from moekit.experiment.runner import run_comparison, run_one
from moekit.experiment.scaling import DenseFit, dense_equivalent, fit_dense, plot_scaling, scaling_analysis
from moekit.experiment.verdict import paired_verdicts, t_interval, verdict_metrics, verdict_sentence, verdicts_sentence

# fmt: off
__all__ = [
    "TASKS", "CompareConfig", "Comparison", "MatchReport", "RunSpec", "TaskAdapter", "check_matched", "dense_twin",
    "describe", "headline", "load_comparison", "matching_table", "param_matched_twin", "plan_runs", "run_comparison",
    "run_one", "write_report", "DenseFit", "dense_equivalent", "fit_dense", "plot_scaling", "scaling_analysis",
    "paired_verdicts", "t_interval", "verdict_metrics", "verdict_sentence", "verdicts_sentence",
]
# fmt: on
