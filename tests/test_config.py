"""Unit tests for `GuardConfig`: defaults, immutability and range checks with useful messages."""

from __future__ import annotations

import math
from typing import Any

import pytest
from pydantic import ValidationError

from inference_safeguard import GuardConfig
from inference_safeguard.config import MIN_TEMPERATURE


def test_defaults_are_valid_and_candidates_fill_the_beams() -> None:
    config = GuardConfig()
    assert config.num_candidates % config.beam_width == 0
    assert config.children_per_beam == config.num_candidates // config.beam_width
    assert config.safety_discount == 1.0
    assert config.stop == ()
    assert config.on_unsafe == "refuse"
    assert GuardConfig.model_validate(config.model_dump()) == config


def test_paper_settings_are_accepted() -> None:
    config = GuardConfig(
        block_size=32,
        num_candidates=128,
        beam_width=32,
        max_new_tokens=128,
        resample_rounds=2,
        budget=10,
        safety_discount=0.999,
    )
    assert config.children_per_beam == 4


def test_config_is_frozen() -> None:
    config = GuardConfig()
    with pytest.raises(ValidationError, match="frozen"):
        config.budget = 1.0  # type: ignore[misc]
    assert config.budget == 0.0


def test_unknown_fields_are_rejected() -> None:
    with pytest.raises(ValidationError, match="num_candidate"):
        GuardConfig(num_candidate=16)  # type: ignore[call-arg]


def test_num_candidates_not_a_multiple_of_beam_width_names_both_and_suggests_a_value() -> None:
    with pytest.raises(ValidationError) as info:
        GuardConfig(num_candidates=10, beam_width=4)
    message = str(info.value)
    assert "num_candidates (10)" in message
    assert "beam_width (4)" in message
    suggestion = int(message.split("try num_candidates=")[1].split()[0].rstrip(".,'\""))
    assert suggestion % 4 == 0
    assert GuardConfig(num_candidates=suggestion, beam_width=4).num_candidates == suggestion


def test_suggested_num_candidates_is_at_least_beam_width() -> None:
    with pytest.raises(ValidationError, match=r"try num_candidates=8\b"):
        GuardConfig(num_candidates=3, beam_width=8)


@pytest.mark.parametrize(
    ("overrides", "field", "hint"),
    [
        ({"block_size": 0}, "block_size", "greater than or equal to 1"),
        ({"block_size": -4}, "block_size", "greater than or equal to 1"),
        ({"num_candidates": 0}, "num_candidates", "greater than or equal to 1"),
        ({"beam_width": 0}, "beam_width", "greater than or equal to 1"),
        ({"max_new_tokens": 0}, "max_new_tokens", "greater than or equal to 1"),
        ({"resample_rounds": -1}, "resample_rounds", "greater than or equal to 0"),
        ({"unsafe_penalty": -1.0}, "unsafe_penalty", "greater than or equal to 0"),
        ({"unsafe_logit_penalty": -0.5}, "unsafe_logit_penalty", "greater than or equal to 0"),
        ({"top_p": 0.0}, "top_p", "greater than 0"),
        ({"top_p": 1.5}, "top_p", "less than or equal to 1"),
        ({"top_k": -1}, "top_k", "greater than or equal to 0"),
        ({"temperature": -0.1}, "temperature", "greater than or equal to 0"),
        ({"safety_discount": 0.0}, "safety_discount", "greater than 0"),
        ({"safety_discount": 1.01}, "safety_discount", "less than or equal to 1"),
        ({"budget": math.inf}, "budget", "finite"),
        ({"budget": -math.inf}, "budget", "finite"),
        ({"budget": math.nan}, "budget", "finite"),
        ({"stop": ["</s>", ""]}, "stop", "non-empty"),
        ({"stop": ""}, "stop", "non-empty"),
        ({"seed": -1}, "seed", "greater than or equal to 0"),
        ({"on_unsafe": "ignore"}, "on_unsafe", "'refuse', 'return' or 'raise'"),
        ({"scorer": "latent"}, "scorer", "'auto', 'models' or 'critic'"),
        ({"stream_commit": "token"}, "stream_commit", "'agreement' or 'block'"),
    ],
)
def test_out_of_range_values_raise_a_value_error_naming_the_field(
    overrides: dict[str, Any], field: str, hint: str
) -> None:
    with pytest.raises(ValidationError) as info:
        GuardConfig(**overrides)
    assert isinstance(info.value, ValueError)
    errors = info.value.errors()
    assert [e["loc"][0] for e in errors] == [field]
    assert hint in str(info.value)


@pytest.mark.parametrize(
    ("overrides", "field", "hint"),
    [
        ({"unsafe_logit_penalty": math.inf}, "unsafe_logit_penalty", "finite"),
        ({"unsafe_logit_penalty": 1e7}, "unsafe_logit_penalty", "less than or equal to 1000000"),
        ({"unsafe_penalty": math.inf}, "unsafe_penalty", "finite"),
        ({"unsafe_penalty": math.nan}, "unsafe_penalty", "finite"),
        ({"critic_risk_weight": math.inf}, "critic_risk_weight", "finite"),
        ({"safety_discount": math.nan}, "safety_discount", "finite"),
        ({"temperature": 1e-300}, "temperature", "use temperature=0 for greedy decoding"),
        ({"temperature": 1e-4}, "temperature", "at least 0.001"),
        ({"temperature": math.nan}, "temperature", "finite"),
        ({"top_p": math.nan}, "top_p", "finite"),
        ({"budget": True}, "budget", "got the bool True; pass a number such as budget=0.0"),
        ({"num_candidates": True}, "num_candidates", "got the bool True"),
        ({"unsafe_logit_penalty": False}, "unsafe_logit_penalty", "got the bool False"),
        ({"seed": True}, "seed", "got the bool True; pass a number such as seed=0"),
        ({"top_k": False}, "top_k", "got the bool False"),
        ({"num_candidates": 16.0}, "num_candidates", "valid integer"),
        ({"budget": "1"}, "budget", "valid number"),
        ({"cost_probe": 1}, "cost_probe", "valid boolean"),
    ],
)
def test_degenerate_settings_are_rejected_with_a_fix(
    overrides: dict[str, Any], field: str, hint: str
) -> None:
    with pytest.raises(ValidationError) as info:
        GuardConfig(**overrides)
    assert [e["loc"][0] for e in info.value.errors()] == [field]
    assert hint in str(info.value)


def test_smallest_sampling_temperature_and_integral_floats_are_accepted() -> None:
    config = GuardConfig(temperature=MIN_TEMPERATURE, budget=1, unsafe_penalty=5)
    assert (config.temperature, config.budget, config.unsafe_penalty) == (1e-3, 1.0, 5.0)
    assert isinstance(config.budget, float)


def test_boundary_values_are_accepted() -> None:
    config = GuardConfig(
        temperature=0.0,
        top_p=1.0,
        top_k=0,
        safety_discount=1.0,
        resample_rounds=0,
        unsafe_penalty=0.0,
        unsafe_logit_penalty=0.0,
        budget=-3.0,
        num_candidates=1,
        beam_width=1,
        block_size=1,
        seed=0,
    )
    assert config.children_per_beam == 1


@pytest.mark.parametrize(
    ("stop", "expected"),
    [
        ("###", ("###",)),
        (["a", "b"], ("a", "b")),
        (("x",), ("x",)),
        (None, ()),
        ([], ()),
    ],
)
def test_stop_accepts_a_string_or_a_list_and_becomes_a_tuple(
    stop: Any, expected: tuple[str, ...]
) -> None:
    config = GuardConfig(stop=stop)
    assert config.stop == expected
    assert isinstance(config.stop, tuple)


def test_with_overrides_returns_a_validated_changed_copy() -> None:
    config = GuardConfig(budget=1.0, stop="END")
    changed = config.with_overrides(temperature=0.0, stop=["A", "B"])
    assert changed.temperature == 0.0
    assert changed.stop == ("A", "B")
    assert changed.budget == 1.0
    assert config.temperature == 1.0
    assert config.stop == ("END",)


def test_with_overrides_validates_values_and_cross_field_rules() -> None:
    config = GuardConfig(num_candidates=16, beam_width=4)
    with pytest.raises(ValidationError, match="block_size"):
        config.with_overrides(block_size=0)
    with pytest.raises(ValidationError, match=r"beam_width \(5\)"):
        config.with_overrides(beam_width=5)
    assert config.with_overrides(num_candidates=32, beam_width=8).children_per_beam == 4


def test_with_overrides_rejects_unknown_names() -> None:
    with pytest.raises(ValidationError, match="temprature"):
        GuardConfig().with_overrides(temprature=0.5)


def test_with_overrides_without_arguments_is_equal_to_the_original() -> None:
    config = GuardConfig(budget=2.0, seed=3, stop=["x"])
    assert config.with_overrides() == config


def test_every_field_has_a_description() -> None:
    for name, field in GuardConfig.model_fields.items():
        assert field.description and field.description.strip(), name
