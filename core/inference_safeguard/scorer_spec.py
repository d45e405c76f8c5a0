"""One-line scorer specs: `"key=value;key=value"` strings that the scorers' `from_spec` read.

A spec is what a command-line option or a config file can hold for a scorer: options
separated by `;`, each `key=value` (spaces around both are trimmed); a list value
separates its items with `,`. For example `"max_words=60;min_words=10"` or
`"words=Paris,France;weight=2"`.
"""

from __future__ import annotations

import math
from collections.abc import Collection


def parse_spec(spec: str, owner: str, allowed: Collection[str]) -> dict[str, str]:
    """The options of `spec` as `{key: value}`.

    Args:
        spec: the one-line spec, e.g. `"max_words=60;weight=2"`.
        owner: the scorer being built, for error messages.
        allowed: the keys that scorer takes.

    Raises:
        ValueError: not a str, an option without `=`, a repeated or unknown key.
    """
    if not isinstance(spec, str):
        raise TypeError(f"{owner}.from_spec: spec must be a str, got {type(spec).__name__}.")
    hint = f"write options as key=value separated by ';' (keys: {', '.join(sorted(allowed))})"
    options: dict[str, str] = {}
    for item in filter(None, (part.strip() for part in spec.split(";"))):
        key, sep, value = (part.strip() for part in item.partition("="))
        if not sep or not key:
            raise ValueError(f"{owner}.from_spec: {item!r} is not key=value; {hint}.")
        if key not in allowed:
            raise ValueError(f"{owner}.from_spec: unknown option {key!r}; {hint}.")
        if key in options:
            raise ValueError(f"{owner}.from_spec: option {key!r} is given twice; {hint}.")
        options[key] = value
    return options


def spec_list(value: str) -> list[str]:
    """The comma-separated items of a spec value, trimmed, empty ones dropped."""
    return [item.strip() for item in value.split(",") if item.strip()]


def spec_int(options: dict[str, str], key: str, owner: str) -> int | None:
    """`options[key]` as an int, or None when absent."""
    if key not in options:
        return None
    try:
        return int(options[key])
    except ValueError as exc:
        raise ValueError(
            f"{owner}.from_spec: {key}={options[key]!r} is not an integer; write e.g. {key}=8."
        ) from exc


def spec_float(options: dict[str, str], key: str, owner: str, default: float) -> float:
    """`options[key]` as a finite float, or `default` when absent."""
    if key not in options:
        return default
    try:
        value = float(options[key])
    except ValueError as exc:
        raise ValueError(
            f"{owner}.from_spec: {key}={options[key]!r} is not a number; write e.g. {key}=1.5."
        ) from exc
    if not math.isfinite(value):
        raise ValueError(f"{owner}.from_spec: {key} must be finite, got {options[key]!r}.")
    return value
