"""Throughput and latency of `safeguard serve` under concurrent clients, with the
engine's batching on and off: one command, one run.

The script starts `safeguard serve` twice on the same model and settings, each a fresh
process on 127.0.0.1:

- **batched**: the default engine (`--max-rows 512`): requests join the running search
  at block boundaries and share its batched steps;
- **one at a time**: `--max-rows` equal to one request's rows (`--num-candidates`), so
  the engine holds one request at a time and the others wait in its queue, in arrival
  order: what a server without batching does.

Both run side by side (an idle server takes no CPU); at each of 1, 4, 16 and 64
concurrent clients (`--clients`) the script drives one server, then the other, so that
drift in the machine's speed hits both alike. Each client sends `--rounds` chat
completions one after the other (more at low concurrency, so that every level has at
least `--min-requests`), with fixed seeds (client i's round r has seed 1000 i + r and
its own question) and `max_tokens`, so both servers answer the same requests (two
servers hold two copies of the model: mind the memory of a large `--model` on a GPU).
Throughput is responses and completion tokens per second of wall time from the first
request to the last response; latency is each request's
seconds from sending to the full response, as p50 and p95. The ratios compare the two
servers in this run, and a lone request's latency is the batched server's p50 at one
client.

Targets (printed, met or not; the script exits 0 either way): at 16 clients, batched
throughput at least 4x one-at-a-time, with p95 latency under 2x a lone request's.

Model: a random-weight Llama (`inference_safeguard.testing.build_tiny_llama`, with the
768-token test tokenizer) saved to a temporary directory, `--shape tiny` (hidden 256,
4 layers, 4 heads, as in `cpu_overhead.py`) or `--shape test` (hidden 64, 2 layers: the
test suite's, whose steps cost little more at 64 rows than at 4, so that it shows what
batching saves when a step is mostly fixed cost, as on a GPU); or `--model` (hub name or
directory, loaded as `safeguard serve` loads it).
Responses end at EOS or `max_tokens`, the same for both servers; the token columns show
what was produced. Nothing is downloaded.

Usage:
    python benchmarks/serve_load.py                          # tiny model on CPU
    python benchmarks/serve_load.py --json-out load.json --clients 1,4,16
    python benchmarks/serve_load.py --shape test
    python benchmarks/serve_load.py --device cuda --model path/to/model --max-tokens 128
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import platform
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from contextlib import ExitStack
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import httpx

ROOT = Path(__file__).resolve().parents[1]
MODEL = "load-test"
STARTUP_SECONDS = 180
QUESTIONS = (
    "Where is the dog?",
    "Name a bird that sings in the morning.",
    "What is in the garden?",
    "How do I bake bread?",
    "Tell me about the cat and the mouse.",
    "What should I feed a small bird in winter?",
    "Say hello to the neighbours.",
    "Why is the sky blue?",
)
"""Client i asks question i mod 8 (with its round in it), so prompts differ in length."""
SHAPES: dict[str, dict[str, int]] = {
    "tiny": {"hidden_size": 256, "num_layers": 4, "num_heads": 4},
    "test": {"hidden_size": 64, "num_layers": 2, "num_heads": 4},
}


@dataclass
class Level:
    """One server at one number of concurrent clients."""

    server: str
    clients: int
    responses: int
    completion_tokens: int
    seconds: float
    responses_per_second: float
    tokens_per_second: float
    p50_latency: float
    p95_latency: float
    errors: int


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    clients = sorted({int(n) for n in args.clients.split(",")})
    with tempfile.TemporaryDirectory(prefix="serve-load-") as scratch, ExitStack() as stack:
        model = args.model or _save_tiny_model(Path(scratch) / "model", args.shape)
        servers = {
            "batched": ["--max-rows", "512"],
            "one at a time": ["--max-rows", str(args.num_candidates)],
        }
        urls = {
            name: stack.enter_context(_Server(args, model, options, Path(scratch) / f"{i}.log"))
            for i, (name, options) in enumerate(servers.items())
        }
        for url in urls.values():
            asyncio.run(_drive(url, args, clients=1, rounds=args.warmup))  # untimed
        levels: list[Level] = []
        for count in clients:
            rounds = max(args.rounds, math.ceil(args.min_requests / count))
            for name, url in urls.items():  # back to back, so drift hits both alike
                level = asyncio.run(_drive(url, args, clients=count, rounds=rounds))
                levels.append(_level(name, count, *level))
                print(_row(levels[-1]), file=sys.stderr, flush=True)
    report = _report(args, levels)
    print()
    print(_table(levels))
    for line in report["verdict"]:
        print(line)
    if args.json_out:
        Path(args.json_out).write_text(json.dumps(report, indent=2) + "\n")
    return 0


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", help="hub name or directory (default: a tiny random Llama)")
    parser.add_argument(
        "--shape",
        choices=SHAPES,
        default="tiny",
        help="the random model's size, without --model (default: %(default)s)",
    )
    parser.add_argument("--device", default="cpu", help="cpu or cuda (default: %(default)s)")
    parser.add_argument("--dtype", default="auto", help="as `safeguard serve --dtype`")
    parser.add_argument("--clients", default="1,4,16,64", help="concurrency levels")
    parser.add_argument("--rounds", type=int, default=2, help="requests each client sends")
    parser.add_argument(
        "--min-requests",
        type=int,
        default=16,
        help="at least this many requests per level: fewer clients send more rounds",
    )
    parser.add_argument("--warmup", type=int, default=2, help="untimed requests per server")
    parser.add_argument("--num-candidates", type=int, default=4)
    parser.add_argument("--beam-width", type=int, default=2)
    parser.add_argument("--block-size", type=int, default=8)
    parser.add_argument("--max-tokens", type=int, default=32, help="max_tokens of a request")
    parser.add_argument(
        "--threads", type=int, default=1, help="torch threads of the server (default: 1)"
    )
    parser.add_argument("--json-out", help="write the table and settings as JSON here")
    return parser


def _save_tiny_model(directory: Path, shape: str) -> str:
    from inference_safeguard.testing import build_tiny_llama, build_tiny_tokenizer

    tokenizer = build_tiny_tokenizer()
    model = build_tiny_llama(tokenizer, max_position_embeddings=1024, **SHAPES[shape])
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return str(directory)


class _Server:
    """A `safeguard serve` process for the `with` block; its URL on entry."""

    def __init__(self, args: argparse.Namespace, model: str, options: list[str], log: Path):
        self.port = _free_port()
        self.log = log
        self.command = [
            sys.executable,
            "-m",
            "inference_safeguard.cli",
            "serve",
            "--model",
            model,
            "--device",
            args.device,
            "--dtype",
            args.dtype,
            "--cost-keywords",
            "bomb,poison",
            "--num-candidates",
            str(args.num_candidates),
            "--beam-width",
            str(args.beam_width),
            "--block-size",
            str(args.block_size),
            "--max-new-tokens",
            str(args.max_tokens),
            "--served-model-name",
            MODEL,
            "--port",
            str(self.port),
            *options,
        ]
        threads = str(args.threads)
        self.env = {
            **os.environ,
            "HF_HUB_OFFLINE": "1",
            "OMP_NUM_THREADS": threads,
            "MKL_NUM_THREADS": threads,
            "PYTHONPATH": os.pathsep.join(
                [str(ROOT / "core"), str(ROOT), os.environ.get("PYTHONPATH", "")]
            ),
        }

    def __enter__(self) -> str:
        with self.log.open("wb") as output:
            self.process = subprocess.Popen(
                self.command, env=self.env, stdout=output, stderr=subprocess.STDOUT
            )
        url = f"http://127.0.0.1:{self.port}"
        deadline = time.monotonic() + STARTUP_SECONDS
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise SystemExit(f"the server exited:\n{self.log.read_text()}")
            try:
                with urllib.request.urlopen(f"{url}/health", timeout=2) as response:
                    if response.status == 200:
                        return url
            except OSError:
                time.sleep(0.3)
        self.__exit__()
        log = self.log.read_text()
        raise SystemExit(f"the server did not start in {STARTUP_SECONDS} s:\n{log}")

    def __exit__(self, *exc: object) -> None:
        self.process.terminate()
        try:
            self.process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


async def _drive(
    url: str, args: argparse.Namespace, *, clients: int, rounds: int
) -> tuple[list[float], int, float, int]:
    """Run `clients` clients of `rounds` requests each; their latencies, completion
    tokens, the wall seconds of it all and the number of failed requests."""
    latencies: list[float] = []
    tokens = errors = 0
    limits = httpx.Limits(max_connections=clients + 1)
    async with httpx.AsyncClient(base_url=url, timeout=600, limits=limits) as http:

        async def client(index: int) -> None:
            nonlocal tokens, errors
            for round_ in range(rounds):
                question = QUESTIONS[index % len(QUESTIONS)]
                body = {
                    "model": MODEL,
                    "messages": [{"role": "user", "content": f"{question} ({round_})"}],
                    "max_tokens": args.max_tokens,
                    "seed": 1000 * index + round_,
                }
                sent = time.perf_counter()
                response = await http.post("/v1/chat/completions", json=body)
                if response.status_code != 200:
                    errors += 1
                    continue
                latencies.append(time.perf_counter() - sent)
                tokens += response.json()["usage"]["completion_tokens"]

        began = time.perf_counter()
        await asyncio.gather(*(client(i) for i in range(clients)))
        return latencies, tokens, time.perf_counter() - began, errors


def _level(
    server: str, clients: int, latencies: list[float], tokens: int, seconds: float, errors: int
) -> Level:
    ordered = sorted(latencies) or [float("nan")]
    return Level(
        server=server,
        clients=clients,
        responses=len(latencies),
        completion_tokens=tokens,
        seconds=seconds,
        responses_per_second=len(latencies) / seconds,
        tokens_per_second=tokens / seconds,
        p50_latency=statistics.median(ordered),
        p95_latency=ordered[min(len(ordered) - 1, round(0.95 * (len(ordered) - 1)))],
        errors=errors,
    )


def _row(level: Level) -> str:
    return (
        f"| {level.server} | {level.clients} | {level.responses} | "
        f"{level.responses_per_second:.2f} | {level.tokens_per_second:.1f} | "
        f"{level.p50_latency:.2f} | {level.p95_latency:.2f} | {level.errors} |"
    )


def _table(levels: list[Level]) -> str:
    head = (
        "| server | clients | responses | responses/s | tokens/s | p50 s | p95 s | errors |\n"
        "|---|---|---|---|---|---|---|---|"
    )
    by_clients = {(level.server, level.clients): level for level in levels}
    ratios = ["", "| clients | batched / one-at-a-time throughput | batched p95 / lone p50 |"]
    ratios.append("|---|---|---|")
    lone = by_clients.get(("batched", 1))
    for (server, clients), level in by_clients.items():
        other = by_clients.get(("one at a time", clients))
        if server != "batched" or other is None:
            continue
        speedup = level.responses_per_second / other.responses_per_second
        tail = level.p95_latency / lone.p50_latency if lone else float("nan")
        ratios.append(f"| {clients} | {speedup:.2f}x | {tail:.2f}x |")
    return "\n".join([head, *(_row(level) for level in levels), *ratios])


def _report(args: argparse.Namespace, levels: list[Level]) -> dict[str, Any]:
    by_clients = {(level.server, level.clients): level for level in levels}
    verdict = []
    batched, alone = by_clients.get(("batched", 16)), by_clients.get(("one at a time", 16))
    lone = by_clients.get(("batched", 1))
    if batched and alone and lone:
        speedup = batched.responses_per_second / alone.responses_per_second
        tail = batched.p95_latency / lone.p50_latency
        verdict = [
            f"16 clients: batched throughput {speedup:.2f}x one-at-a-time "
            f"(target >= 4x: {'met' if speedup >= 4 else 'NOT met'})",
            f"16 clients: batched p95 latency {tail:.2f}x a lone request's "
            f"(target < 2x: {'met' if tail < 2 else 'NOT met'})",
        ]
    return {
        "settings": vars(args),
        "machine": {
            "platform": platform.platform(),
            "python": platform.python_version(),
            "cpus": os.cpu_count(),
            "load_average": os.getloadavg(),
        },
        "levels": [asdict(level) for level in levels],
        "verdict": verdict,
    }


if __name__ == "__main__":
    sys.exit(main())
