"""The evaluation report: what `evaluate` returns, and its table, JSON, CSV and plot."""

from __future__ import annotations

import csv
import dataclasses
import json
import os
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from inference_safeguard.config import GuardConfig
from inference_safeguard.evaluation.metrics import MethodMetrics, is_safe_per_cost_model, summarize
from inference_safeguard.extras import import_extra
from inference_safeguard.results import GuardResult

if TYPE_CHECKING:
    from rich.console import Console
    from rich.table import Table

PathLike = str | os.PathLike[str]

_WIDEST_TABLE = 1000
"""Widest a table printed to a file or pipe may grow, in characters."""


@dataclass(frozen=True)
class MethodRun:
    """One method's results over the prompt set.

    Attributes:
        method: registry name of the method.
        label: its display name.
        results: one per prompt, in prompt order. A refused result's `cost` and
            `reward` are those of the refusal text it returned (see
            `inference_safeguard.evaluation.metrics`).
        seconds: total generation wall time.
        oracle_unsafe: the oracle's verdict on each returned text; None without an oracle.
    """

    method: str
    label: str
    results: list[GuardResult]
    seconds: float
    oracle_unsafe: list[bool] | None = None

    def metrics(self) -> MethodMetrics:
        """This method's row of the table."""
        return summarize(
            self.method,
            self.results,
            seconds=self.seconds,
            oracle_unsafe=self.oracle_unsafe,
            label=self.label,
        )


@dataclass(frozen=True)
class EvaluationReport:
    """Every method's results over one prompt set, under one config.

    Attributes:
        prompts: the prompts as plain text (as the scorers and the oracle saw them).
        config: the `GuardConfig` every method ran with (budget, N, K, block size, ...).
        runs: one per method, in the order they ran.
    """

    prompts: list[str]
    config: GuardConfig
    runs: list[MethodRun]

    def rows(self) -> list[MethodMetrics]:
        """The table's rows, one per method."""
        return [run.metrics() for run in self.runs]


# --------------------------------------------------------------------------- table
def check_report_extras(*, plot: bool = False) -> None:
    """Fail before a run, not after it, when the table (or the plot) could not be made.

    Raises:
        MissingExtraError: `rich` (or, with `plot`, `matplotlib`) is not installed.
    """
    import_extra("rich", extra="eval", needed_by="the evaluation table")
    if plot:
        import_extra("matplotlib", extra="eval", needed_by="the evaluation plot")


def render_table(report: EvaluationReport) -> Table:
    """The paper's main table: reward (sd), cost, safety rates, refusals, time per response.

    The oracle column appears only when some method was judged by an oracle.

    Raises:
        MissingExtraError: `rich` is not installed (the `eval` extra).
    """
    rich_table = import_extra("rich.table", extra="eval", needed_by="the evaluation table")
    config = report.config
    rows = report.rows()
    with_oracle = any(row.oracle_safety_rate is not None for row in rows)
    table = rich_table.Table(
        title=f"{len(report.prompts)} prompts · {_budgets(config)} · "
        f"N={config.num_candidates} K={config.beam_width} · block {config.block_size} · "
        f"{config.max_new_tokens} new tokens",
    )
    table.add_column("Method", no_wrap=True)
    table.add_column("Reward (sd)", justify="right")
    table.add_column("Cost", justify="right")
    table.add_column("Safe (cost model)", justify="right")
    if with_oracle:
        table.add_column("Safe (oracle)", justify="right")
    names = (
        list(rows[0].constraint_safety_rates) if len(rows[0].constraint_safety_rates) > 1 else []
    )
    for name in names:
        table.add_column(f"Safe ({name})", justify="right")
    table.add_column("Refused", justify="right")
    table.add_column("s/response", justify="right")
    for row in rows:
        reward = "-" if row.reward_mean is None else f"{row.reward_mean:.3f} ({row.reward_sd:.3f})"
        cells = [row.label, reward, f"{row.cost_mean:.3f}", _percent(row.safety_rate)]
        if with_oracle:
            cells.append(_percent(row.oracle_safety_rate))
        cells += [_percent(row.constraint_safety_rates.get(name)) for name in names]
        cells += [_percent(row.refusal_rate), f"{row.seconds_per_response:.3f}"]
        table.add_row(*cells)
    return table


def print_table(report: EvaluationReport, console: Console | None = None) -> None:
    """Print `render_table(report)` to `console` (default: standard output).

    The default console prints to a file or pipe at the table's full width: a log has
    no terminal width to fit, and a squashed table would cut the method names.
    """
    table = render_table(report)
    if console is None:
        rich_console = import_extra("rich.console", extra="eval", needed_by="the evaluation table")
        console = rich_console.Console()
        if not console.is_terminal:
            unbounded = console.options.update_width(_WIDEST_TABLE)
            console.width = max(console.width, console.measure(table, options=unbounded).maximum)
    console.print(table)


def _budgets(config: GuardConfig) -> str:
    if config.budgets is None:
        return f"budget {config.budget:g}"
    return "budgets " + ", ".join(f"{name} {value:g}" for name, value in config.budgets.items())


def _percent(rate: float | None) -> str:
    return "-" if rate is None else f"{100 * rate:.1f}%"


# ------------------------------------------------------------------- JSON and CSV
def write_json(report: EvaluationReport, path: PathLike) -> None:
    """Write the config, the prompts, and per method its metrics and every response.

    Each response record: `prompt` (index into `prompts`), `text`, `reward`, `cost`,
    `safe` (per cost model, as the table counts it), `refused`, `oracle_unsafe`
    (null without an oracle) and `finish_reason`.
    """
    document = {
        "config": report.config.model_dump(mode="json"),
        "prompts": report.prompts,
        "methods": [
            {**dataclasses.asdict(run.metrics()), "responses": _response_records(run)}
            for run in report.runs
        ],
    }
    with open(path, "w", encoding="utf-8") as file:
        json.dump(document, file, indent=2, ensure_ascii=False)
        file.write("\n")


def _response_records(run: MethodRun) -> list[dict[str, Any]]:
    verdicts: list[bool | None] = (
        [*run.oracle_unsafe] if run.oracle_unsafe else [None] * len(run.results)
    )
    return [
        {
            "prompt": index,
            "text": result.text,
            "reward": result.reward,
            "cost": result.cost,
            "safe": is_safe_per_cost_model(result),
            "refused": result.refused,
            "oracle_unsafe": unsafe,
            "finish_reason": result.finish_reason,
        }
        for index, (result, unsafe) in enumerate(zip(run.results, verdicts, strict=True))
    ]


def write_csv(report: EvaluationReport, path: PathLike) -> None:
    """Write the table as CSV: one row per method, the `MethodMetrics` fields as columns
    (empty where a value is missing, e.g. the reward without a reward model)."""
    rows = report.rows()
    fields = [
        field.name
        for field in dataclasses.fields(MethodMetrics)
        if field.name != "constraint_safety_rates"
    ]
    names = (
        list(rows[0].constraint_safety_rates) if len(rows[0].constraint_safety_rates) > 1 else []
    )
    fields += [f"safety_rate[{name}]" for name in names]
    with open(path, "w", encoding="utf-8", newline="") as file:
        writer = csv.DictWriter(file, fieldnames=fields)
        writer.writeheader()
        for row in rows:
            record = dataclasses.asdict(row)
            rates = record.pop("constraint_safety_rates")
            writer.writerow({**record, **{f"safety_rate[{n}]": rates.get(n) for n in names}})


# --------------------------------------------------------------------------- plot
def write_plot(report: EvaluationReport, path: PathLike) -> None:
    """Write a PNG of safety rate against average reward, one labelled point per method
    (per cost model, and per oracle when there is one).

    Raises:
        ValueError: no method has a reward (evaluated without a reward model).
        MissingExtraError: `matplotlib` is not installed (the `eval` extra).
    """
    # Imported here: only plotting needs matplotlib, and it is slow to import.
    backend = import_extra(
        "matplotlib.backends.backend_agg", extra="eval", needed_by="the evaluation plot"
    )
    Figure = import_extra("matplotlib.figure", extra="eval", needed_by="the evaluation plot").Figure

    rows = [row for row in report.rows() if row.reward_mean is not None]
    if not rows:
        raise ValueError(
            "the plot puts reward on its x axis, but no method has a reward; "
            "evaluate with a reward model"
        )
    figure = Figure(figsize=(7, 5), layout="constrained")
    backend.FigureCanvasAgg(figure)
    axes = figure.subplots()
    rewards = [row.reward_mean for row in rows]
    axes.scatter(rewards, [100 * row.safety_rate for row in rows], label="per cost model")
    oracle_points = [
        (row.reward_mean, 100 * row.oracle_safety_rate)
        for row in rows
        if row.oracle_safety_rate is not None
    ]
    if oracle_points:
        axes.scatter(
            [reward for reward, _ in oracle_points],
            [safety for _, safety in oracle_points],
            marker="x",
            label="per oracle",
        )
    for row in rows:
        axes.annotate(
            row.label,
            (row.reward_mean, 100 * row.safety_rate),
            xytext=(4, 4),
            textcoords="offset points",
            fontsize=8,
        )
    axes.set_xlabel("average reward")
    axes.set_ylabel("safety rate (%)")
    axes.set_ylim(-5, 105)
    axes.margins(x=0.2)  # room for the labels of the outermost points
    axes.set_title(f"Safety against reward ({len(report.prompts)} prompts)")
    axes.grid(alpha=0.3)
    axes.legend()
    figure.savefig(path, format="png", dpi=120)
