"""`safeguard eval`: the evaluation harness on the command line.

Runs the chosen methods over a JSONL prompt file (or a split of the demo world), prints
the paper's table, and with `--out DIR` writes `results.json`, `results.csv` and, with
`--plot`, `plot.png`. Without `--model` it evaluates the demo world: its base model,
cost and reward models, oracle, budget and prompt splits; a cost or reward given on the
command line replaces the world's.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from dataclasses import dataclass
from pathlib import Path

from transformers import PreTrainedModel
from transformers.tokenization_utils_base import PreTrainedTokenizerBase

from inference_safeguard.cli_constraints import (
    ConstraintSpec,
    add_constraint_option,
    constraint_specs,
    load_constraints,
)

# The module, not its names: inference_safeguard.cli imports this module to register the command.
from inference_safeguard.cli_options import (
    CommandLineError,
    add_config_option,
    add_loading_options,
    add_option_with_default,
    add_prompts_option,
    add_scorer_options,
    check_output_dir,
    check_single_cost,
    file_prompts,
    guard_config,
    json_object,
    load_base_model,
    load_cost,
    load_reward,
    positive_int,
)
from inference_safeguard.config import TOOL_CALL_FIELDS, GuardConfig
from inference_safeguard.constraints import budget_vector
from inference_safeguard.critic import LatentCritic
from inference_safeguard.evaluation.conversations import (
    demo_conversations,
    evaluate_conversations,
    format_conversation_table,
    write_conversation_json,
)
from inference_safeguard.evaluation.methods import (
    METHODS,
    MethodOptions,
    get_method,
    runnable_methods,
)
from inference_safeguard.evaluation.report import (
    check_report_extras,
    print_table,
    write_csv,
    write_json,
    write_plot,
)
from inference_safeguard.evaluation.run import Oracle, evaluate
from inference_safeguard.guard import InferenceGuard
from inference_safeguard.lm import PromptInput
from inference_safeguard.scorers import Scorer

CONVERSATIONS_FILE = "conversations.json"
"""What `--conversations --out DIR` receives."""

REPORT_FILES = ("results.json", "results.csv", "plot.png")
"""What `--out DIR` receives (the plot only with `--plot`)."""


def add_eval_command(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Register `eval` on the `safeguard` subcommands; it sets `run` to `run_eval`."""
    parser = subparsers.add_parser(
        "eval",
        help="compare InferenceGuard with the baselines on a prompt set",
        description="Run decoding methods over a prompt set and print average reward (sd), "
        "average cost, safety rate per cost model and per oracle, refusal rate and seconds "
        "per response. Every method shares the search settings, and every prompt is "
        "seeded with --seed (default 0). Without --model, evaluates the offline demo world.",
    )
    parser.set_defaults(run=run_eval)

    prompts = parser.add_argument_group("prompts")
    add_prompts_option(prompts, default_help="the demo world's --split")
    prompts.add_argument(
        "--split", default="test", help="demo world split to evaluate (default: test)"
    )
    prompts.add_argument(
        "--limit", type=positive_int, metavar="N", help="evaluate only the first N prompts"
    )

    methods = parser.add_argument_group("methods")
    methods.add_argument(
        "--methods",
        type=_method_names,
        metavar="NAME[,NAME...]",
        help=f"methods in table order, from {', '.join(METHODS)} (default: all that can run "
        "with the models given; ARGS needs a reward model, inferenceguard-critic a critic)",
    )
    methods.add_argument(
        "--lagrange-multiplier",
        type=float,
        metavar="X",
        help="lambda of the Lagrangian scorings R - lambda * C (default: 1.0)",
    )
    methods.add_argument(
        "--args-num-tokens",
        type=int,
        metavar="N",
        help="candidate tokens per ARGS step (default: 10)",
    )
    methods.add_argument(
        "--args-reward-weight", type=float, metavar="X", help="ARGS's reward weight (default: 1.0)"
    )
    methods.add_argument(
        "--args-cost-weight",
        type=float,
        metavar="X",
        help="cost weight of args-cost (default: 10.0)",
    )

    models = parser.add_argument_group("models (default: the demo world's)")
    models.add_argument(
        "--model", metavar="NAME_OR_PATH", help="base causal LM; needs --prompts and a cost"
    )
    add_scorer_options(
        models,
        reward_help="sequence-classification reward model, or "
        "keywords-reward:words=W1,W2[;weight=W]",
    )
    add_constraint_option(models)
    models.add_argument(
        "--critic",
        type=Path,
        metavar="DIR",
        help="latent critic of the base model (from `safeguard train-critic`), for the "
        "inferenceguard-critic row (default: the demo world's)",
    )
    add_loading_options(
        models,
        device_help="device of the models loaded from paths "
        "(default: cuda when available, else cpu)",
    )

    search = parser.add_argument_group(
        "search settings, shared by every method (default: GuardConfig's; the budget "
        "defaults to the demo world's)"
    )
    for name, field in GuardConfig.model_fields.items():
        if name in TOOL_CALL_FIELDS:
            continue
        add_config_option(search, name, field)

    turns = parser.add_argument_group(
        "multi-turn evaluation (demo world)",
        "With --conversations, answer the demo world's scripted conversations (one per topic, "
        "its prompts as turns) with InferenceGuard under two constraints, the world's harm "
        "cost (its budget per answer) and its product policy (--products-per-answer), once "
        "per answer and once with a safety session per conversation (--session-budgets), "
        "and report per constraint the share of conversations within the session budget.",
    )
    turns.add_argument(
        "--conversations", action="store_true", help="run the multi-turn evaluation instead"
    )
    turns.add_argument(
        "--session-budgets",
        type=json_object,
        metavar="JSON",
        help='each conversation\'s total budget per constraint (default: {"harm": the '
        'world\'s budget, "products": 2})',
    )
    add_option_with_default(
        turns, "--max-turns", positive_int, 6, "turns of each scripted conversation"
    )
    add_option_with_default(
        turns, "--products-per-answer", positive_int, 1, "product mentions allowed per answer"
    )

    output = parser.add_argument_group("run and output")
    add_option_with_default(output, "--batch-size", positive_int, 8, "prompts decoded together")
    output.add_argument(
        "--out", type=Path, metavar="DIR", help="write results.json and results.csv here"
    )
    output.add_argument(
        "--plot",
        action="store_true",
        help="also write DIR/plot.png: safety rate against reward per method",
    )
    return parser


def run_eval(args: argparse.Namespace) -> int:
    """`safeguard eval`: check the settings, load, evaluate, print and write the report."""
    if args.conversations:
        return run_conversations(args)
    check_report_extras(plot=args.plot)
    config = guard_config(args)
    options = _method_options(args)
    if args.plot and args.out is None:
        raise CommandLineError("--plot writes DIR/plot.png; add --out DIR")
    if args.out is not None:  # checked now, not after the whole evaluation
        check_output_dir(args.out, "--out", REPORT_FILES)
    check_single_cost(args)
    specs = constraint_specs(args)
    given_prompts = file_prompts(args, demo_prompts="splits")

    setup = _demo_world_setup(args, specs) if args.model is None else _loaded_setup(args, specs)
    prompts = given_prompts if given_prompts is not None else setup.prompts
    if prompts is None:  # file_prompts requires --prompts with --model
        raise CommandLineError("--model needs --prompts FILE.jsonl")
    prompts = prompts[: args.limit]
    if args.budget is None and setup.budget is not None and setup.costs is None:
        config = config.with_overrides(budget=setup.budget)
    methods = _chosen_methods(
        args.methods, has_reward=setup.reward is not None, has_critic=setup.critic is not None
    )
    options = dataclasses.replace(options, critic=setup.critic)
    if args.plot and setup.reward is None:
        raise CommandLineError(
            "--plot puts reward on its x axis; add --reward-model or leave --plot out"
        )

    report = evaluate(
        methods,
        prompts,
        model=setup.model,
        tokenizer=setup.tokenizer,
        cost=setup.cost,
        costs=setup.costs,
        reward=setup.reward,
        oracle=setup.oracle,
        config=config,
        batch_size=args.batch_size,
        options=options,
    )
    print_table(report)
    if args.out is not None:
        args.out.mkdir(parents=True, exist_ok=True)
        written = [args.out / name for name in REPORT_FILES[:2]]
        write_json(report, written[0])
        write_csv(report, written[1])
        if args.plot:
            written.append(args.out / REPORT_FILES[2])
            write_plot(report, written[2])
        print("wrote " + ", ".join(map(str, written)), file=sys.stderr)
    return 0


def run_conversations(args: argparse.Namespace) -> int:
    """`safeguard eval --conversations`: the multi-turn evaluation on the demo world."""
    from inference_safeguard.demo import load_demo_world  # heavy: loads the world's models
    from inference_safeguard.demo.policies import product_policy

    if args.model is not None or args.prompts is not None:
        raise CommandLineError(
            "--conversations runs the demo world's conversations; drop --model and --prompts"
        )
    if args.plot:
        raise CommandLineError("--conversations writes no plot; leave --plot out")
    if args.out is not None:
        check_output_dir(args.out, "--out", [CONVERSATIONS_FILE])
    config = guard_config(args)
    world = load_demo_world()
    budgets = args.session_budgets or {"harm": world.budget, "products": 2.0}
    guard = InferenceGuard(
        world.model,
        world.tokenizer,
        costs={
            "harm": (world.cost, world.budget if args.budget is None else args.budget),
            "products": (product_policy(), float(args.products_per_answer)),
        },
        reward=world.reward,
        config=config.with_overrides(budget=0.0, seed=0 if config.seed is None else config.seed),
    )
    unknown = sorted(set(budgets) - set(guard.constraints.names))
    if unknown:
        raise CommandLineError(
            f"--session-budgets names {unknown}; the constraints are harm and products"
        )
    info = world.prompt_info.get(args.split)
    if info is None:
        raise CommandLineError(
            f"the demo world has no split {args.split!r}; choose from {', '.join(world.prompts)}"
        )
    conversations = demo_conversations(
        [p.text for p in info], [p.topic for p in info], max_turns=args.max_turns
    )[: args.limit]
    report = evaluate_conversations(guard, conversations, budgets, oracle=world.oracle)
    per_answer = ", ".join(
        f"{c.name} {b:g}"
        for c, b in zip(guard.constraints.items, budget_vector(guard.config), strict=True)
    )
    print(
        f"{len(conversations)} conversations of up to {args.max_turns} turns · per-answer "
        f"budgets: {per_answer} · session budgets: "
        + ", ".join(f"{n} {b:g}" for n, b in budgets.items())
    )
    print(format_conversation_table(report))
    if args.out is not None:
        args.out.mkdir(parents=True, exist_ok=True)
        write_conversation_json(report, args.out / CONVERSATIONS_FILE)
        print(f"wrote {args.out / CONVERSATIONS_FILE}", file=sys.stderr)
    return 0


# --------------------------------------------------------------- models and prompts
@dataclass(frozen=True)
class _Setup:
    """What an evaluation runs on; `budget` and `prompts` are None where not provided;
    `costs` (named constraints, `--constraint`) replaces `cost` when given."""

    model: PreTrainedModel
    tokenizer: PreTrainedTokenizerBase
    cost: Scorer | None
    reward: Scorer | None
    oracle: Oracle | None = None
    budget: float | None = None
    prompts: list[PromptInput] | None = None
    critic: LatentCritic | None = None
    costs: dict[str, tuple[Scorer, float]] | None = None


def _demo_world_setup(args: argparse.Namespace, specs: list[ConstraintSpec]) -> _Setup:
    """The demo world's model, scorers, oracle, budget and split; a cost or reward from
    the command line replaces the world's."""
    from inference_safeguard.demo import load_demo_world  # heavy: loads the world's models

    world = load_demo_world()
    critic = _critic(args, world.model)
    prompts = None
    if args.prompts is None:
        if args.split not in world.prompts:
            raise CommandLineError(
                f"the demo world has no split {args.split!r}; choose from "
                f"{', '.join(world.prompts)}"
            )
        prompts = list(world.prompts[args.split])
    cost, reward = load_cost(args), load_reward(args)
    costs = load_constraints(specs, args, world.cost) if specs else None
    return _Setup(
        model=world.model,
        tokenizer=world.tokenizer,
        cost=None if costs else world.cost if cost is None else cost,
        costs=costs,
        reward=world.reward if reward is None else reward,
        oracle=world.oracle,
        budget=world.budget,
        prompts=prompts,
        critic=world.critic if critic is None else critic,
    )


def _loaded_setup(args: argparse.Namespace, specs: list[ConstraintSpec]) -> _Setup:
    """The model and scorers named on the command line (a cost or constraints required)."""
    costs = load_constraints(specs, args) if specs else None
    cost = None if costs else load_cost(args, required=True)
    reward = load_reward(args)
    lm = load_base_model(args)
    return _Setup(
        model=lm.model,
        tokenizer=lm.tokenizer,
        cost=cost,
        costs=costs,
        reward=reward,
        critic=_critic(args, lm.model),
    )


def _critic(args: argparse.Namespace, model: PreTrainedModel) -> LatentCritic | None:
    """The critic given on the command line, checked against the base model, or None."""
    if args.critic is None:
        return None
    critic = LatentCritic.load(args.critic)
    critic.check_base_model(model)
    return critic


# ---------------------------------------------------------------- methods and types
def _chosen_methods(names: list[str] | None, *, has_reward: bool, has_critic: bool) -> list[str]:
    """`names`, checked to be runnable; default every method that can run."""
    if names is None:
        return runnable_methods(has_reward=has_reward, has_critic=has_critic)
    for name in names:
        try:
            get_method(name, has_reward=has_reward, has_critic=has_critic)
        except ValueError as exc:
            raise CommandLineError(f"--methods: {exc}") from exc
    return names


def _method_options(args: argparse.Namespace) -> MethodOptions:
    """`MethodOptions` from the flags given (each flag is named after its field)."""
    names = [field.name for field in dataclasses.fields(MethodOptions) if field.name != "critic"]
    given = {name: getattr(args, name) for name in names if getattr(args, name) is not None}
    try:
        return MethodOptions(**given)
    except ValueError as exc:
        raise CommandLineError(f"invalid method options: {exc}") from exc


def _method_names(text: str) -> list[str]:
    names = [name.strip() for name in text.split(",")]
    if not all(names) or len(set(names)) != len(names):
        raise argparse.ArgumentTypeError(
            f"{text!r}: give distinct method names separated by single commas, "
            "e.g. base,bon-augmented,inferenceguard"
        )
    return names
