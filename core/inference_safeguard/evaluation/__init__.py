"""Evaluation harness: decoders compared on a prompt set, in the paper's table.

- `methods`: the registry of decoders by name (`METHODS`), built from shared parts.
- `metrics`: the table's columns as pure functions over `GuardResult`s.
- `run`: `evaluate`, which runs the methods and returns an `EvaluationReport`.
- `report`: the report's table, JSON, CSV and plot.
- `cli`: the `safeguard eval` subcommand.
"""

from inference_safeguard.evaluation.methods import METHODS, Method, MethodOptions, build_decoder
from inference_safeguard.evaluation.metrics import MethodMetrics, summarize
from inference_safeguard.evaluation.report import (
    EvaluationReport,
    MethodRun,
    print_table,
    render_table,
    write_csv,
    write_json,
    write_plot,
)
from inference_safeguard.evaluation.run import Oracle, evaluate

__all__ = [
    "METHODS",
    "EvaluationReport",
    "Method",
    "MethodMetrics",
    "MethodOptions",
    "MethodRun",
    "Oracle",
    "build_decoder",
    "evaluate",
    "print_table",
    "render_table",
    "summarize",
    "write_csv",
    "write_json",
    "write_plot",
]
