"""The `safeguard` console script: argument parsing, one function per subcommand.

`safeguard generate` loads a local (or hub) causal LM, wraps it in `InferenceGuard`
with the cost and reward models named on the command line, and prints the response
with its safety record. Every `GuardConfig` field is a flag, generated from the
pydantic model so that the two never drift apart. `safeguard serve` loads the same
way (or, without `--model`, the demo world) and serves the guard over an
OpenAI-compatible HTTP API (`inference_safeguard.server`).

Exit codes: 0 success, 2 bad command line, bad settings or a path that cannot be
loaded (a one-line `safeguard: error: ...` on stderr, no traceback), 3 the response
stayed over budget and `--on-unsafe raise` was given.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import socket
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from inference_safeguard.backends import BACKENDS
from inference_safeguard.backends.vllm import VLLMModel, engine_options
from inference_safeguard.cli_constraints import (
    add_constraint_option,
    constraint_specs,
    load_constraints,
)
from inference_safeguard.cli_options import (
    KEYWORDS_REWARD,
    CommandLineError,
    add_config_option,
    add_cost_keywords_option,
    add_loading_options,
    base_model_options,
    from_pretrained_options,
    guard_config,
    json_object,
    load_reward,
    loading,
    parse_regex_cost,
    positive_float,
    positive_int,
    read_stdin_text,
)
from inference_safeguard.config import TOOL_CALL_FIELDS, GuardConfig
from inference_safeguard.critic import LatentCritic
from inference_safeguard.demo.command import add_demo_command
from inference_safeguard.engine import GuardEngine
from inference_safeguard.errors import LoadOptionError, SafeguardError, UnsafeGenerationError
from inference_safeguard.evaluation.cli import add_eval_command
from inference_safeguard.extras import MissingExtraError, import_extra
from inference_safeguard.guard import InferenceGuard
from inference_safeguard.lm import PromptInput
from inference_safeguard.results import GuardResult
from inference_safeguard.scorers import (
    ClassifierScorer,
    GuardModelCost,
    Scorer,
)
from inference_safeguard.session import SafetySessions
from inference_safeguard.training.cli import add_train_critic_command

EXIT_USAGE = 2
"""Bad command line, invalid settings, or a model path that cannot be loaded."""
EXIT_UNSAFE = 3
"""The response stayed over budget and `--on-unsafe raise` was given."""


# ----------------------------------------------------------------------- entry point
def main(argv: list[str] | None = None) -> int:
    """Run the `safeguard` command line and return its exit status.

    Args:
        argv: the arguments after the program name; default `sys.argv[1:]`.
    """
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exit_:  # argparse exits on --help and on usage errors
        return exit_.code if isinstance(exit_.code, int) else EXIT_USAGE
    try:
        return args.run(args)
    except UnsafeGenerationError as exc:
        _report(exc)
        return EXIT_UNSAFE
    except (SafeguardError, CommandLineError, MissingExtraError, OSError) as exc:
        _report(exc)
        return EXIT_USAGE


def _report(error: Exception) -> None:
    print(f"safeguard: error: {error}", file=sys.stderr)


def build_parser() -> argparse.ArgumentParser:
    """The `safeguard` parser; each subcommand sets `run`, the function that carries it out."""
    parser = argparse.ArgumentParser(
        prog="safeguard",
        description="Almost-surely-safe generation from local Hugging Face models "
        "(InferenceGuard, arXiv 2502.01208).",
    )
    subcommands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    _add_generate(subcommands)
    _add_serve(subcommands)
    add_eval_command(subcommands)
    add_train_critic_command(subcommands)
    add_demo_command(subcommands)
    return parser


# ------------------------------------------------------------------------- generate
def _add_generate(subcommands: argparse._SubParsersAction) -> None:
    parser = subcommands.add_parser(
        "generate",
        help="generate one response within a safety budget",
        description="Generate one response with InferenceGuard and print it with its "
        "safety record. Give at least one cost: several are added up.",
    )
    parser.set_defaults(run=run_generate)
    _add_model_options(
        parser,
        required=True,
        help_text="causal LM: hub name, local directory or path to a .gguf file",
    )

    prompt = parser.add_argument_group("prompt")
    prompt.add_argument(
        "--prompt", required=True, metavar="TEXT", help="the prompt; '-' reads it from stdin"
    )
    prompt.add_argument(
        "--chat",
        action="store_true",
        help="send the prompt as one user message through the chat template "
        "(default: plain text, used as is)",
    )

    _add_scorer_and_search_options(parser, costs_title="cost and reward (at least one cost)")

    output = parser.add_argument_group("output")
    output.add_argument(
        "--json",
        action="store_true",
        help="print one JSON object (text, safety record, finish_reason, stats) instead",
    )


def _add_model_options(parser: argparse.ArgumentParser, *, required: bool, help_text: str) -> None:
    """The base model and how every model loads: the options `_load_guard` reads."""
    model = parser.add_argument_group("base model")
    model.add_argument("--model", required=required, metavar="NAME_OR_PATH", help=help_text)
    model.add_argument(
        "--draft-model",
        metavar="NAME_OR_PATH",
        help="a smaller model with the same tokenizer that drafts tokens for --model to "
        "verify (speculative candidates: the same distribution, faster when it agrees); "
        "self:bf16, self:int8 or self:int4 drafts with --model itself in bfloat16 or "
        "with weight-only int8/int4 linear layers (CPU)",
    )
    model.add_argument(
        "--draft-tokens", type=int, default=4, metavar="N", help="tokens drafted per round"
    )
    add_loading_options(
        model,
        device_help="device of every model (default: cuda when available, else cpu)",
        dtype_help="dtype of every model (default: bfloat16 on CUDA and float32 on CPU for "
        "the base model; the checkpoint's own for cost and reward models)",
    )
    parser.set_defaults(default_vllm_engine="llm")
    backend = parser.add_argument_group(
        "backend",
        "Where the base model runs. vllm (installed separately) serves it from a vLLM "
        "engine, across GPUs and nodes; cost and reward models stay on Hugging Face.",
    )
    backend.add_argument(
        "--backend",
        choices=BACKENDS,
        default="huggingface",
        help="huggingface (default: this process, every feature) or vllm (no critic mode, "
        "no response_format or required tool calls)",
    )
    backend.add_argument(
        "--tensor-parallel-size",
        type=positive_int,
        metavar="N",
        help="vllm: GPUs each layer is split across (e.g. 8 on one node)",
    )
    backend.add_argument(
        "--pipeline-parallel-size",
        type=positive_int,
        metavar="N",
        help="vllm: pipeline stages the layers are split into (e.g. one per node)",
    )
    backend.add_argument(
        "--distributed-executor-backend",
        choices=("mp", "ray", "uni"),
        help="vllm: mp (processes on one node), ray (several nodes) or uni (one process)",
    )
    backend.add_argument(
        "--vllm-engine",
        choices=("llm", "async"),
        help="vllm: llm (vllm.LLM, driven by one thread at a time; default of generate) or "
        "async (vLLM's AsyncLLM: every request's rows batch continuously in one engine core "
        "process, whatever thread submits them; default of serve)",
    )
    backend.add_argument(
        "--engine-kwargs",
        type=json_object,
        metavar="JSON",
        help='vllm: more vllm.LLM options as a JSON object, e.g. \'{"max_model_len": 4096, '
        '"gpu_memory_utilization": 0.8}\'',
    )


def _engine_options(args: argparse.Namespace) -> dict[str, Any]:
    """The vLLM engine options of the command line (`--dtype` and `--trust-remote-code`
    included); refused without `--backend vllm`."""
    options = engine_options(
        tensor_parallel_size=args.tensor_parallel_size,
        pipeline_parallel_size=args.pipeline_parallel_size,
        distributed_executor_backend=args.distributed_executor_backend,
        engine_kwargs=args.engine_kwargs,
    )
    if args.backend != "vllm":
        if options or args.vllm_engine is not None:
            raise CommandLineError(
                "--tensor-parallel-size, --pipeline-parallel-size, "
                "--distributed-executor-backend, --vllm-engine and --engine-kwargs need "
                "--backend vllm"
            )
        return {}
    options["engine"] = args.vllm_engine or args.default_vllm_engine
    options["trust_remote_code"] = args.trust_remote_code
    if args.dtype is not None:
        options["dtype"] = args.dtype
    return options


def _add_scorer_and_search_options(parser: argparse.ArgumentParser, *, costs_title: str) -> None:
    """The cost, reward and critic options, and every `GuardConfig` field that a command
    line can set, read by `_load_costs`, `_load_guard` and `guard_config`."""
    scorers = parser.add_argument_group(costs_title)
    add_constraint_option(scorers)
    add_cost_keywords_option(scorers)
    scorers.add_argument(
        "--cost-regex",
        type=parse_regex_cost,
        action="append",
        metavar="PATTERN",
        help="cost 1 per match of this regular expression (case-insensitive); repeatable",
    )
    scorers.add_argument(
        "--cost-model",
        "--cost",
        dest="cost_model",
        metavar="PATH",
        help="sequence-classification cost model (higher = more unsafe), e.g. Beaver-style",
    )
    scorers.add_argument(
        "--cost-template",
        metavar="TEMPLATE",
        help="input format of --cost-model with {response} and optionally {prompt} "
        "(default: its chat template, else '{prompt}\\n\\n{response}')",
    )
    scorers.add_argument(
        "--guard-model",
        metavar="PATH",
        help="guard LLM (Llama-Guard style); the cost is its P(unsafe)",
    )
    scorers.add_argument(
        "--reward-model",
        "--reward",
        dest="reward_model",
        metavar="PATH",
        help="sequence-classification reward model, or keywords-reward:words=W1,W2[;weight=W] "
        "(a reward per listed word present; default: rank candidates by likelihood)",
    )
    scorers.add_argument(
        "--critic",
        type=Path,
        metavar="DIR",
        help="latent critic of --model (from `safeguard train-critic`): critic mode",
    )

    search = parser.add_argument_group("search settings (default: GuardConfig's)")
    for name, field in GuardConfig.model_fields.items():
        if name in TOOL_CALL_FIELDS:
            continue
        add_config_option(search, name, field)


def run_generate(args: argparse.Namespace) -> int:
    """`safeguard generate`: load, generate, print. Settings are checked before any load."""
    prompt = _read_prompt(args.prompt, chat=args.chat)
    config = guard_config(args)
    _check_costs(args, command="generate")
    guard = _load_guard(args, config)
    result = guard.generate(prompt)
    print(_as_json(result) if args.json else _as_text(result))
    return 0


def _check_costs(args: argparse.Namespace, *, command: str) -> None:
    """Refuse, before any load, cost options that do not go together, and a `--model`
    without a cost."""
    constraint_specs(args)
    if (args.reward_model or "").startswith(KEYWORDS_REWARD):
        load_reward(args)  # a malformed spec fails before anything loads
    if args.cost_template is not None and args.cost_model is None:
        raise CommandLineError(
            "--cost-template formats the input of --cost-model; add --cost-model"
        )
    if args.model is not None and not _costs_given(args):
        raise CommandLineError(
            f"{command} needs a cost: pass --cost-keywords, --cost-regex, --cost-model or "
            "--guard-model (several are added up), or named constraints with --constraint"
        )


def _costs_given(args: argparse.Namespace) -> bool:
    return bool(
        args.cost_keywords
        or args.cost_regex
        or args.cost_model
        or args.guard_model
        or args.constraint
    )


def _load_costs(args: argparse.Namespace) -> Scorer:
    """The cost of the command line: the sum of every cost given (at least one)."""
    costs: list[Scorer | None] = [args.cost_keywords, *(args.cost_regex or [])]
    load = from_pretrained_options(args)
    if args.cost_model is not None:
        template = {} if args.cost_template is None else {"template": args.cost_template}
        with loading("--cost-model", args.cost_model):
            costs.append(ClassifierScorer.from_pretrained(args.cost_model, **load, **template))
    if args.guard_model is not None:
        with loading("--guard-model", args.guard_model):
            costs.append(GuardModelCost.from_pretrained(args.guard_model, **load))
    return _sum_of(costs)


def _load_guard(args: argparse.Namespace, config: GuardConfig) -> InferenceGuard:
    """The `InferenceGuard` of `--model` with the costs, reward and critic given."""
    critic = None if args.critic is None else LatentCritic.load(args.critic)
    specs = constraint_specs(args)
    costs = load_constraints(specs, args) if specs else None
    cost = None if specs else _load_costs(args)
    reward = load_reward(args)
    engine = _engine_options(args)
    with loading("--model", args.model):
        if args.backend == "vllm":
            if args.draft_model is not None:
                raise LoadOptionError("--draft-model needs --backend huggingface")
            return InferenceGuard(
                VLLMModel.from_pretrained(args.model, **engine),
                cost=cost,
                costs=costs,
                reward=reward,
                critic=critic,
                config=config,
            )
        return InferenceGuard.from_pretrained(
            args.model,
            cost=cost,
            costs=costs,
            reward=reward,
            critic=critic,
            config=config,
            draft_model=args.draft_model,
            draft_tokens=args.draft_tokens,
            **base_model_options(args),
        )


def _read_prompt(value: str, *, chat: bool) -> PromptInput:
    # A shell pipe ends the text with a newline that is not part of the prompt.
    text = read_stdin_text().rstrip("\n") if value == "-" else value
    return [{"role": "user", "content": text}] if chat else text


class _SumOfCosts(Scorer):
    """Cost = the sum of several costs, each scored on the whole batch."""

    def __init__(self, costs: Sequence[Scorer]) -> None:
        self.costs = tuple(costs)

    def _score(self, prompts: list[str], responses: list[str]) -> torch.Tensor:
        """Returns `(batch,)` summed costs."""
        return torch.stack([cost(prompts, responses) for cost in self.costs]).sum(dim=0)


def _sum_of(costs: Sequence[Scorer | None]) -> Scorer:
    given = [cost for cost in costs if cost is not None]
    return given[0] if len(given) == 1 else _SumOfCosts(given)


# ---------------------------------------------------------------------------- serve
API_KEY_VARIABLE = "SAFEGUARD_API_KEY"
"""The environment variable `safeguard serve` reads its API key from (`--api-key` wins)."""

DEMO_MODEL_NAME = "safeguard-demo"
"""The model name of the demo world when served without `--served-model-name`."""


def _add_serve(subcommands: argparse._SubParsersAction) -> None:
    parser = subcommands.add_parser(
        "serve",
        help="serve InferenceGuard over an OpenAI-compatible HTTP API",
        description="Serve InferenceGuard over an OpenAI-compatible HTTP API (chat and text "
        "completions, streaming, tools, structured output, Prometheus metrics at /metrics). "
        "Without --model, serves the offline demo world. Needs the [serve] extra.",
    )
    parser.set_defaults(run=run_serve)
    _add_model_options(
        parser,
        required=False,
        help_text="causal LM: hub name, local directory or path to a .gguf file (default: "
        "the demo world's model, cost and reward; a cost or reward given replaces the world's)",
    )
    # The server's threads (its engine's scheduler, calls the engine cannot take) share
    # the model: an AsyncLLM batches them, where a vllm.LLM takes them in turn.
    parser.set_defaults(default_vllm_engine="async")
    _add_scorer_and_search_options(parser, costs_title="cost and reward (a --model needs a cost)")

    http = parser.add_argument_group("HTTP")
    http.add_argument(
        "--host",
        default="127.0.0.1",
        help="address to listen on (default: %(default)s; 0.0.0.0 for every interface)",
    )
    http.add_argument(
        "--port", type=positive_int, default=8000, help="port to listen on (default: %(default)s)"
    )
    http.add_argument(
        "--api-key",
        metavar="KEY",
        help="require 'Authorization: Bearer KEY' on /v1/ routes (default: the "
        f"{API_KEY_VARIABLE} environment variable; none: open)",
    )
    http.add_argument(
        "--served-model-name",
        metavar="NAME",
        help=f"the model id clients send (default: --model, or {DEMO_MODEL_NAME!r})",
    )
    http.add_argument(
        "--max-prompt-tokens",
        type=positive_int,
        metavar="N",
        help="refuse longer prompts with a 400 (default: only the model's context window)",
    )

    engine = parser.add_argument_group(
        "batching",
        "Requests are served by one engine that batches them at block boundaries: a request "
        "holds --num-candidates rows while it runs; one that does not fit waits in a queue.",
    )
    engine.add_argument(
        "--max-rows",
        type=positive_int,
        default=512,
        metavar="N",
        help="most decode rows in flight, over all running requests (default: %(default)s; "
        "--num-candidates serves one request at a time)",
    )
    engine.add_argument(
        "--max-queued",
        type=positive_int,
        default=1024,
        metavar="N",
        help="most requests waiting for rows; beyond it a request is answered 429 with "
        "Retry-After (default: %(default)s)",
    )
    engine.add_argument(
        "--session-budgets",
        type=json_object,
        metavar="JSON",
        help="keep safety sessions: the total budget per constraint name of each session a "
        "request names (safety_session or the X-Safety-Session header), e.g. "
        "'{\"cost\": 1.0}' (default: no sessions)",
    )
    engine.add_argument(
        "--max-sessions",
        type=positive_int,
        default=10000,
        metavar="N",
        help="most safety sessions kept; beyond it the least recently used is forgotten "
        "(default: %(default)s)",
    )
    engine.add_argument(
        "--request-timeout",
        type=positive_float,
        metavar="SECONDS",
        help="stop a response that takes longer and answer 504 (default: no limit)",
    )


def run_serve(args: argparse.Namespace) -> int:
    """`safeguard serve`: check the extra and the settings, load, then serve until stopped."""
    uvicorn = import_extra("uvicorn", extra="serve", needed_by="safeguard serve")
    from inference_safeguard.server import create_app  # needs the [serve] extra

    config = guard_config(args)
    _check_costs(args, command="serve")
    if args.max_rows < config.num_candidates:
        raise CommandLineError(
            f"--max-rows {args.max_rows} cannot hold one request's {config.num_candidates} "
            "rows (--num-candidates); raise it"
        )
    _check_address(args.host, args.port)
    guard = _load_guard(args, config) if args.model is not None else _demo_guard(args, config)
    sessions = _sessions(args, guard)
    engine = GuardEngine(guard, max_rows=args.max_rows, max_queued=args.max_queued)
    try:
        app = create_app(
            engine,
            model_name=args.served_model_name or args.model or DEMO_MODEL_NAME,
            api_key=args.api_key or os.environ.get(API_KEY_VARIABLE) or None,
            max_prompt_tokens=args.max_prompt_tokens,
            request_timeout=args.request_timeout,
            sessions=sessions,
        )
        uvicorn.run(app, host=args.host, port=args.port)
    finally:
        engine.close()  # requests still queued or running fail with a 503
    return 0


def _sessions(args: argparse.Namespace, guard: InferenceGuard) -> SafetySessions | None:
    """The safety sessions of `--session-budgets`, checked against the guard's constraints."""
    if args.session_budgets is None:
        return None
    unknown = sorted(set(args.session_budgets) - set(guard.constraints.names))
    if unknown:
        raise CommandLineError(
            f"--session-budgets names {unknown}, which are not constraints of the guard; its "
            f"constraints are {list(guard.constraints.names)}"
        )
    try:
        return SafetySessions(args.session_budgets, max_sessions=args.max_sessions)
    except ValueError as exc:
        raise CommandLineError(f"--session-budgets: {exc}") from exc


def _check_address(host: str, port: int) -> None:
    """Refuse, before a long model load, an address the server could not listen on (a
    port in use, a host that is not this machine's)."""
    try:
        family, kind, protocol, _, address = socket.getaddrinfo(
            host, port, type=socket.SOCK_STREAM
        )[0]
        with socket.socket(family, kind, protocol) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn does
            probe.bind(address)
    except OSError as exc:
        raise CommandLineError(
            f"cannot listen on {host}:{port} ({exc.strerror or exc}); choose another --port "
            "or --host"
        ) from exc


def _demo_guard(args: argparse.Namespace, config: GuardConfig) -> InferenceGuard:
    """InferenceGuard on the demo world, with the costs, reward and critic given in place
    of the world's (its own critic with `--scorer critic`), and its budget by default."""
    from inference_safeguard.demo import load_demo_world  # heavy: loads the world's models
    from inference_safeguard.demo.build import ASSETS

    engine = _engine_options(args)
    world = load_demo_world(device=args.device or "cpu")
    specs = constraint_specs(args)
    if args.budget is None and not specs:
        config = config.with_overrides(budget=world.budget)
    critic = None if args.critic is None else LatentCritic.load(args.critic)
    if critic is None and config.scorer == "critic":
        critic = world.critic
    base: Any = world.model
    if args.backend == "vllm":  # the world's base model, in a vLLM engine
        base = VLLMModel.from_pretrained(str(ASSETS / "base"), **engine)
    return InferenceGuard(
        base,
        world.tokenizer,
        cost=None if specs else _load_costs(args) if _costs_given(args) else world.cost,
        costs=load_constraints(specs, args, world.cost) if specs else None,
        reward=load_reward(args) or world.reward,
        critic=critic,
        config=config,
    )


# ------------------------------------------------------------------------- output
def _record(result: GuardResult) -> dict[str, Any]:
    """Safety record, finish reason and stats of `result`, in that order."""
    return {
        **result.safety_record(),
        "finish_reason": result.finish_reason,
        **dataclasses.asdict(result.stats),
    }


def _as_text(result: GuardResult) -> str:
    """The response, a blank line, then the record as aligned `name  value` lines, each
    constraint on its own line (`constraint[NAME]  cost / budget  safe|over`)."""
    record = _record(result)
    constraints = record.pop("constraints")
    rows = {name: _format_value(value) for name, value in record.items()}
    for name, outcome in constraints.items():
        verdict = "safe" if outcome["safe"] else "over"
        rows[f"constraint[{name}]"] = (
            f"{_format_value(outcome['cost'])} / {_format_value(outcome['budget'])}  {verdict}"
        )
    width = max(map(len, rows))
    lines = [f"{name:<{width}}  {value}" for name, value in rows.items()]
    return "\n".join([result.text, "", *lines])


def _format_value(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def _as_json(result: GuardResult) -> str:
    """One JSON object: the text, the safety record and finish reason, and `stats`."""
    return json.dumps(
        {
            "text": result.text,
            **result.safety_record(),
            "finish_reason": result.finish_reason,
            "stats": dataclasses.asdict(result.stats),
        }
    )


if __name__ == "__main__":
    sys.exit(main())
