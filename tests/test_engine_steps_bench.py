"""`benchmarks/engine_steps.py` end to end on the test shape with two small searches."""

from __future__ import annotations

import importlib
import json
import math
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
engine_steps = importlib.import_module("engine_steps")


@pytest.fixture(scope="module")
def report(tmp_path_factory: pytest.TempPathFactory) -> dict:
    out = tmp_path_factory.mktemp("engine-steps") / "steps.json"
    status = engine_steps.main(
        ["--shape", "test", "--requests", "1,3", "--repeats", "1", "--json-out", str(out)]
    )
    assert status == 0
    return json.loads(out.read_text())


def test_each_search_is_split_into_phases_that_add_up_to_its_step(report: dict) -> None:
    steps = report["shapes"]["test"]["steps"]
    assert [(s["requests"], s["rows"]) for s in steps] == [(1, 4), (3, 12)]
    for step in steps:
        # 32 new tokens in blocks of 8, unless every candidate of a prompt ends early.
        assert 1 <= step["steps"] <= 4
        phases = step["phases_ms"]
        assert set(phases) == {"forward", "sampling", "scoring", "selection", "rest"}
        assert all(phases[name] > 0 for name in ("forward", "sampling", "scoring"))
        assert math.isclose(sum(phases.values()), step["step_ms"], rel_tol=1e-9)


def test_the_forward_alone_is_timed_at_every_row_count(report: dict) -> None:
    forwards = report["shapes"]["test"]["forward"]
    assert [f["rows"] for f in forwards] == list(engine_steps.FORWARD_ROWS)
    assert all(f["forward_ms"] > 0 for f in forwards)


def test_the_phase_timers_leave_the_classes_as_they_were() -> None:
    before = [getattr(owner, name) for owner, name, _ in engine_steps.PHASES]
    totals = dict.fromkeys([label for _, _, label in engine_steps.PHASES], 0.0)
    with engine_steps._phase_timers(totals):
        assert [getattr(owner, name) for owner, name, _ in engine_steps.PHASES] != before
    assert [getattr(owner, name) for owner, name, _ in engine_steps.PHASES] == before
