"""`safeguard train-critic`: collect rollouts of a base model and fit a latent critic to them.

Samples responses to a JSONL prompt file (or the demo world's train split), labels them
with the cost and reward models, fits a `LatentCritic` (with a cost probe unless
`--no-cost-probe`), prints its held-out metrics and saves it to `--out DIR`. Without
`--model` it trains on the demo world: its base model, cost and reward models, budget
and train prompts; a cost or reward given on the command line replaces the world's.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass
from pathlib import Path

from pydantic import ValidationError

from inference_safeguard.cli_options import (
    CommandLineError,
    add_loading_options,
    add_option_with_default,
    add_prompts_option,
    add_scorer_options,
    check_output_dir,
    check_single_cost,
    file_prompts,
    finite_float,
    load_base_model,
    load_cost,
    load_reward,
    non_negative_int,
    positive_int,
)
from inference_safeguard.config import MIN_TEMPERATURE, GuardConfig
from inference_safeguard.critic import CONFIG_FILE, WEIGHTS_FILE
from inference_safeguard.lm import CausalLM, PromptInput
from inference_safeguard.scorers import Scorer
from inference_safeguard.training.fit import CriticTrainingSettings, TrainingReport, train_critic

_SETTING_FLAGS = (
    "epochs",
    "batch_size",
    "learning_rate",
    "weight_decay",
    "width",
    "patience",
    "validation_fraction",
    "budget_augmentation",
)
"""`CriticTrainingSettings` fields with a flag of their own name (`--cost-probe` is
`--no-cost-probe`, and `--seed` also seeds the rollouts)."""


def add_train_critic_command(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Register `train-critic` on the `safeguard` subcommands; it sets `run`."""
    parser = subparsers.add_parser(
        "train-critic",
        help="train a latent critic (and cost probe) for a base model",
        description="Sample responses to training prompts, label them with the cost and "
        "reward models, and fit a latent critic on the base model's hidden states. Prints "
        "metrics on held-out prompts and saves the critic to --out DIR. Without --model, "
        "trains on the offline demo world.",
    )
    parser.set_defaults(run=run_train_critic)

    add_prompts_option(
        parser.add_argument_group("prompts"), default_help="the demo world's train split"
    )

    models = parser.add_argument_group("models (default: the demo world's)")
    models.add_argument(
        "--model",
        metavar="NAME_OR_PATH",
        help="base causal LM; needs --prompts, a cost and a reward",
    )
    add_scorer_options(models, reward_help="sequence-classification reward model (required)")
    add_loading_options(
        models,
        device_help="device of the models (default: cuda when available, else cpu; the demo "
        "world runs on cpu)",
        dtype_help="dtype of the models loaded from paths (default: bfloat16 on CUDA and "
        "float32 on CPU for the base model; the checkpoint's own for cost and reward models)",
    )

    rollouts = parser.add_argument_group("rollouts")
    rollouts.add_argument(
        "--budget",
        type=finite_float,
        metavar="X",
        help="the budget d the critic is trained for (default: the demo world's, else "
        f"{GuardConfig.model_fields['budget'].default})",
    )
    add_option_with_default(
        rollouts,
        "--block-size",
        positive_int,
        GuardConfig.model_fields["block_size"].default,
        "tokens per block; use the search's",
    )
    add_option_with_default(
        rollouts,
        "--max-new-tokens",
        positive_int,
        GuardConfig.model_fields["max_new_tokens"].default,
        "most tokens per response",
    )
    add_option_with_default(
        rollouts, "--samples-per-prompt", positive_int, 8, "responses sampled per prompt"
    )
    add_option_with_default(
        rollouts,
        "--temperature",
        sampling_temperature,
        1.0,
        f"sampling temperature, >= {MIN_TEMPERATURE}",
        metavar="X",
    )
    add_option_with_default(
        rollouts,
        "--seed",
        non_negative_int,
        0,
        "seed of the rollouts, the split, the initial weights and the shuffling",
    )

    training = parser.add_argument_group("training (default: CriticTrainingSettings')")
    for name in _SETTING_FLAGS:
        field = CriticTrainingSettings.model_fields[name]
        training.add_argument(
            "--" + name.replace("_", "-"),
            dest=name,
            type=field.annotation,
            default=None,
            metavar="N" if field.annotation is int else "X",
            help=f"{field.description} (default: {field.default})".replace("%", "%%"),
        )
    training.add_argument(
        "--no-cost-probe",
        dest="cost_probe",
        action="store_false",
        help="train no cost probe (the search then needs the cost model in critic mode)",
    )

    output = parser.add_argument_group("output")
    output.add_argument(
        "--out", type=Path, required=True, metavar="DIR", help="directory to save the critic in"
    )
    output.add_argument("--quiet", action="store_true", help="show no progress bars")
    return parser


def run_train_critic(args: argparse.Namespace) -> int:
    """`safeguard train-critic`: check the settings, load, collect, fit, report, save."""
    settings = _training_settings(args)
    check_single_cost(args)
    check_output_dir(args.out, "--out", (WEIGHTS_FILE, CONFIG_FILE))  # before, not after, the fit
    given_prompts = file_prompts(args, demo_prompts="prompts")

    setup = _demo_world_setup(args) if args.model is None else _loaded_setup(args)
    budget = args.budget if args.budget is not None else setup.budget
    prompts = given_prompts if given_prompts is not None else setup.prompts
    if prompts is None:  # file_prompts requires --prompts with --model
        raise CommandLineError("--model needs --prompts FILE.jsonl")
    _, report = train_critic(
        setup.lm,
        prompts,
        setup.cost,
        setup.reward,
        out=args.out,
        budget=budget,
        block_size=args.block_size,
        max_new_tokens=args.max_new_tokens,
        samples_per_prompt=args.samples_per_prompt,
        temperature=args.temperature,
        settings=settings,
        seed=args.seed,
        progress=not args.quiet,
    )
    print(render_report(report))
    print(f"saved the critic to {args.out}", file=sys.stderr)
    return 0


def render_report(report: TrainingReport) -> str:
    """The held-out metrics of a fit as a titled two-column text table."""

    def number(value: float | None) -> str:
        return "-" if value is None else f"{value:.4g}"

    rows = [
        ("points (train / held out)", f"{report.train_points} / {report.validation_points}"),
        ("rollouts (train / held out)", f"{report.train_rollouts} / {report.validation_rollouts}"),
        ("prompts (train / held out)", f"{report.train_prompts} / {report.validation_prompts}"),
        ("epochs run (best)", f"{report.epochs_run} ({report.best_epoch})"),
        ("held-out safe rate", f"{100 * report.safe_rate:.1f}%"),
        (
            "p_safe Brier (constant baseline)",
            _pair(report.p_safe_brier, report.p_safe_brier_baseline),
        ),
        ("p_safe calibration error", number(report.p_safe_ece)),
        (
            "r_hat MAE / RMSE (reward sd)",
            f"{number(report.r_hat_mae)} / {_pair(report.r_hat_rmse, report.reward_std)}",
        ),
        ("probe MAE", number(report.probe_mae)),
        ("probe over-budget accuracy", number(report.probe_over_budget_accuracy)),
        ("seconds (fit)", f"{report.seconds:.1f}"),
    ]
    metric_width = max(len(metric) for metric, _ in rows)
    value_width = max(len(value) for _, value in rows)
    title = f"Critic on {report.validation_prompts} held-out prompts · budget {report.budget:g}"
    rule = "-" * (metric_width + 2 + value_width)
    lines = [title, rule, f"{'Metric':<{metric_width}}  {'Value':>{value_width}}", rule]
    lines += [f"{metric:<{metric_width}}  {value:>{value_width}}" for metric, value in rows]
    return "\n".join([*lines, rule])


def _pair(value: float, reference: float) -> str:
    return f"{value:.4g} ({reference:.4g})"


# --------------------------------------------------------------- models and prompts
@dataclass(frozen=True)
class _Setup:
    """What a critic is trained on; `prompts` is None where not provided."""

    lm: CausalLM
    cost: Scorer
    reward: Scorer
    budget: float
    prompts: list[PromptInput] | None = None


def _demo_world_setup(args: argparse.Namespace) -> _Setup:
    """The demo world's model, scorers, budget and train prompts; a cost or reward from
    the command line replaces the world's."""
    from inference_safeguard.demo import load_demo_world  # heavy: loads the world's models

    world = load_demo_world(device=args.device or "cpu")
    cost, reward = load_cost(args), load_reward(args)
    return _Setup(
        lm=CausalLM(world.model, world.tokenizer),
        cost=world.cost if cost is None else cost,
        reward=world.reward if reward is None else reward,
        budget=world.budget,
        prompts=list(world.prompts["train"]),
    )


def _loaded_setup(args: argparse.Namespace) -> _Setup:
    """The model and scorers named on the command line (a cost and a reward are required)."""
    cost = load_cost(args, required=True)
    reward = load_reward(args)  # None without --reward-model
    if reward is None:
        raise CommandLineError(
            "--model needs a reward model: --reward-model PATH (the critic learns to "
            "predict the reward of the finished response)"
        )
    lm = load_base_model(args)
    return _Setup(
        lm=lm, cost=cost, reward=reward, budget=GuardConfig.model_fields["budget"].default
    )


# ------------------------------------------------------------------------ settings
def _training_settings(args: argparse.Namespace) -> CriticTrainingSettings:
    """`CriticTrainingSettings` from the flags given; the others keep their defaults."""
    given = {
        name: getattr(args, name) for name in _SETTING_FLAGS if getattr(args, name) is not None
    }
    try:
        return CriticTrainingSettings(**given, cost_probe=args.cost_probe, seed=args.seed)
    except ValidationError as exc:
        problems = [
            f"--{str(error['loc'][0]).replace('_', '-')}: {error['msg']}" for error in exc.errors()
        ]
        raise CommandLineError("invalid training settings: " + "; ".join(problems)) from exc


def sampling_temperature(text: str) -> float:
    """A temperature rollouts can sample with: a finite number >= `MIN_TEMPERATURE`."""
    value = finite_float(text)
    if value < MIN_TEMPERATURE:
        raise argparse.ArgumentTypeError(
            f"expected a temperature >= {MIN_TEMPERATURE} (rollouts are sampled), got {text!r}"
        )
    return value
