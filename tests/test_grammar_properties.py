"""Property tests of grammar-constrained decoding: random JSON Schemas (as a
`response_format` and as tool parameters under a required `tool_choice`) and random
regexes through the guarded search of a random-weight model, with resampling and its
rewind active under the grammar (a cost that counts tokens the JSON is full of).

Properties:
- a response that ends ("stop") is a sentence of its grammar: JSON that validates
  against the schema (`jsonschema`), a call of a given tool whose arguments validate
  against its parameters and nothing else, text the regex matches whole;
- a grammar whose longest sentence fits in `max_new_tokens` always ends: the mask only
  allows EOS once the grammar is complete, and every other token is at least one
  character long, so a search cut by the token limit would be a masking bug.

The generated schemas close their objects (`additionalProperties: false`, or OpenAI's
strict mode) and bound their strings and arrays, except for a few that leave one open;
`longest_json` computes how long their longest canonical JSON can be. Profiles as in
`tests/property_strategies.py` (`fast` by default).
"""

from __future__ import annotations

import json
import re
from typing import Any

import jsonschema
import pytest
from hypothesis import event, given
from hypothesis import strategies as st
from property_strategies import plain_prompts

from inference_safeguard import GuardConfig, GuardResult, InferenceGuard
from inference_safeguard.scorers import KeywordCost
from inference_safeguard.testing import build_tiny_llama
from inference_safeguard.tools import ToolSpec, parse_tool_calls

pytestmark = pytest.mark.filterwarnings(
    "ignore::inference_safeguard.errors.RefusalOverBudgetWarning"
)

TOKEN_LIMIT = 320
"""`max_new_tokens` of every case."""

ESCAPED_CHAR = 12
"""Most JSON text one string character can take: a `\\uXXXX` surrogate pair."""

KEYS = ("a", "id", "name", "tags", "x_1", "Ok")
DEF_NAMES = ("Item", "Point")
ENUM_VALUES = ("x", "yes", "a b", 0, 7, -3, True, False, None)
TOOL_NAMES = ("get_weather", "lookup", "add_item")

DENSE_WORDS = [*"0123456789abcxyz", "true", "false", "null", "yes"]
"""Words the generated JSON is full of: a cost that counts them fails most blocks under a
low budget, so blocks are resampled and rewound under the grammar."""


# ------------------------------------------------------------------ JSON Schemas
def _leaf(defs: dict[str, Any]) -> st.SearchStrategy[dict[str, Any]]:
    """Schemas without children: booleans, bounded integers and strings, enums, and
    references to `defs`."""
    integers = st.integers(-20, 20).flatmap(
        lambda low: st.integers(low, low + 200).map(
            lambda high: {"type": "integer", "minimum": low, "maximum": high}
        )
    )
    strings = st.integers(0, 4).flatmap(
        lambda most: st.integers(0, most).map(
            lambda least: (
                {"type": "string", "maxLength": most} | ({"minLength": least} if least else {})
            )
        )
    )
    enums = st.lists(st.sampled_from(ENUM_VALUES), min_size=1, max_size=3, unique_by=repr).map(
        lambda values: {"enum": values}
    )
    options: list[st.SearchStrategy[dict[str, Any]]] = [
        st.just({"type": "boolean"}),
        integers,
        strings,
        enums,
    ]
    if defs:
        options.append(st.sampled_from(sorted(defs)).map(lambda n: {"$ref": f"#/$defs/{n}"}))
    return st.one_of(options)


@st.composite
def _object(draw: st.DrawFn, child: st.SearchStrategy[dict[str, Any]]) -> dict[str, Any]:
    keys = draw(st.lists(st.sampled_from(KEYS), max_size=3, unique=True))
    schema: dict[str, Any] = {
        "type": "object",
        "properties": {key: draw(child) for key in keys},
    }
    required = [key for key in keys if draw(st.booleans())]
    if required:
        schema["required"] = required
    if draw(st.integers(0, 19)) != 10:  # one in 20 is open (hypothesis favours a range's ends)
        schema["additionalProperties"] = False
    return schema


@st.composite
def _array(draw: st.DrawFn, child: st.SearchStrategy[dict[str, Any]]) -> dict[str, Any]:
    least = draw(st.integers(0, 2))
    schema: dict[str, Any] = {"type": "array", "items": draw(child), "minItems": least}
    if draw(st.integers(0, 19)) != 10:  # one in 20 is unbounded
        schema["maxItems"] = draw(st.integers(max(least, 1), 2))
    return schema


def _schema(defs: dict[str, Any], depth: int) -> st.SearchStrategy[dict[str, Any]]:
    """A schema nested at most `depth` levels: objects, arrays and anyOf over leaves."""
    if depth == 0:
        return _leaf(defs)
    child = _schema(defs, depth - 1)
    return st.one_of(
        _leaf(defs),
        _object(child),
        _array(child),
        st.lists(child, min_size=2, max_size=2).map(lambda options: {"anyOf": options}),
    )


@st.composite
def object_schemas(draw: st.DrawFn) -> dict[str, Any]:
    """An object schema two levels deep, sometimes with `$defs` (named from a small set,
    so two tools' definitions often share a name) that its properties reference."""
    defs: dict[str, Any] = {}
    for name in draw(st.lists(st.sampled_from(DEF_NAMES), max_size=2, unique=True)):
        defs[name] = draw(_schema({}, 1))
    schema = draw(_object(_schema(defs, 1)))
    if defs:
        schema["$defs"] = defs
    return schema


def longest_json(schema: dict[str, Any], root: dict[str, Any], strict: bool = False) -> float:
    """How long the canonical JSON (`", "` and `": "` separators, no other whitespace) of
    a value `schema` admits can be, in characters; infinity for an open object or an
    unbounded array or string. `root` resolves `$ref`; `strict` closes every object."""
    if "$ref" in schema:
        return longest_json(root["$defs"][schema["$ref"].rsplit("/", 1)[-1]], root, strict)
    if "anyOf" in schema:
        return max(longest_json(option, root, strict) for option in schema["anyOf"])
    if "enum" in schema:
        return max(len(json.dumps(value)) for value in schema["enum"])
    kind = schema["type"]
    if kind == "boolean":
        return len("false")
    if kind == "integer":
        return max(len(str(schema["minimum"])), len(str(schema["maximum"])))
    if kind == "string":
        return 2 + ESCAPED_CHAR * schema.get("maxLength", float("inf"))
    if kind == "array":
        most = schema.get("maxItems", float("inf"))
        if most == 0:
            return 2
        return 2 + most * longest_json(schema["items"], root, strict) + 2 * (most - 1)
    if schema.get("additionalProperties", True) is not False and not strict:
        return float("inf")
    members = [
        len(json.dumps(key)) + 2 + longest_json(value, root, strict)
        for key, value in schema["properties"].items()
    ]
    return 2 + sum(members) + 2 * max(len(members) - 1, 0)


# ------------------------------------------------------------------------ regexes
LETTERS = "abcxyz019_"


@st.composite
def _regex_atom(draw: st.DrawFn, space: bool) -> tuple[str, int]:
    """A character or a class, and its length (1)."""
    options = [st.sampled_from(LETTERS), st.sampled_from(["[abc]", "[a-c]", "[0-9]", "\\."])]
    if space:
        options.append(st.just(" "))
    return draw(st.one_of(options)), 1


@st.composite
def _regex_piece(draw: st.DrawFn, depth: int) -> tuple[str, int]:
    """An atom or a group of alternatives, maybe quantified, and its longest match."""
    if depth and draw(st.booleans()):
        options = [draw(_regex_sequence(depth - 1)) for _ in range(draw(st.integers(2, 3)))]
        body, longest = "(" + "|".join(p for p, _ in options) + ")", max(n for _, n in options)
    else:
        body, longest = draw(_regex_atom(space=True))
    quantifier = draw(st.sampled_from(["", "?", "{m}", "{m,n}"]))
    low = draw(st.integers(0, 2))
    high = draw(st.integers(max(low, 1), 3))
    if quantifier == "{m}":
        return f"{body}{{{high}}}", high * longest
    if quantifier == "{m,n}":
        return f"{body}{{{low},{high}}}", high * longest
    return body + quantifier, longest


@st.composite
def _regex_sequence(draw: st.DrawFn, depth: int) -> tuple[str, int]:
    pieces = draw(st.lists(_regex_piece(depth), min_size=1, max_size=3))
    return "".join(p for p, _ in pieces), sum(n for _, n in pieces)


@st.composite
def regexes(draw: st.DrawFn) -> tuple[str, int]:
    """A small regex (a syntax Python's `re` and Rust's `regex` read alike) and the length
    of its longest match. It starts with a required non-space character: a response's
    text is decoded on its own, and a sentencepiece tokenizer drops its leading space."""
    first, _ = draw(_regex_atom(space=False))
    rest, longest = draw(_regex_sequence(depth=1))
    return first + rest, 1 + longest


# ------------------------------------------------------------------------ the runs
@st.composite
def search_settings(draw: st.DrawFn) -> dict[str, Any]:
    """Small searches: a few candidates and beams, short blocks, any sampling, and budgets
    from none (every block with a dense word fails and is resampled) to plenty."""
    beam_width = draw(st.integers(1, 2))
    return {
        "num_candidates": beam_width * draw(st.integers(1, 2)),
        "beam_width": beam_width,
        "block_size": draw(st.integers(1, 6)),
        "max_new_tokens": TOKEN_LIMIT,
        "resample_rounds": draw(st.integers(0, 2)),
        "budget": draw(st.sampled_from([0.0, 1.0, 3.0, 100.0])),
        "on_unsafe": draw(st.sampled_from(["return", "refuse"])),
        "temperature": draw(st.sampled_from([0.0, 0.7, 1.0, 1.5])),
        "top_k": draw(st.sampled_from([0, 5])),
        "seed": draw(st.integers(0, 2**32)),
    }


@pytest.fixture(scope="module")
def guard(tiny_tokenizer, frequent_words: list[str]) -> InferenceGuard:
    """The tiny model (the weights of the `tiny_model` fixture) with room for a prompt
    that describes two tools in the tiny tokenizer's short tokens (several hundred) and
    `TOKEN_LIMIT` more."""
    model = build_tiny_llama(tiny_tokenizer, seed=0, max_position_embeddings=2048)
    cost = KeywordCost([*DENSE_WORDS, *frequent_words])
    return InferenceGuard(model, tiny_tokenizer, cost=cost, config=GuardConfig())


def _ended(result: GuardResult, longest: float) -> bool:
    """Whether `result` is one whose text must be a sentence of its grammar; fails when
    a response whose longest sentence fits was cut by the token limit."""
    event("resampled" if result.stats.resample_rounds else "not resampled")
    event(f"finish_reason: {result.finish_reason}")
    if longest <= TOKEN_LIMIT - 1:  # the last token is EOS
        assert result.finish_reason != "length", (
            f"cut at {len(result.token_ids)} tokens, but no sentence is longer than "
            f"{longest} characters: {result.text!r}"
        )
    else:
        event("no length bound")
    return result.finish_reason == "stop"


@given(schema=object_schemas(), strict=st.booleans(), prompt=plain_prompts, data=st.data())
def test_json_schema_responses_validate(guard, schema, strict, prompt, data):
    jsonschema.Draft202012Validator.check_schema(schema)
    response_format = {
        "type": "json_schema",
        "json_schema": {"name": "answer", "schema": schema, "strict": strict},
    }
    result = guard.generate(prompt, response_format=response_format, **data.draw(search_settings()))
    if _ended(result, longest_json(schema, schema, strict)):
        jsonschema.validate(json.loads(result.text), schema)


@st.composite
def tool_sets(draw: st.DrawFn) -> list[ToolSpec]:
    names = draw(st.lists(st.sampled_from(TOOL_NAMES), min_size=1, max_size=2, unique=True))
    return [ToolSpec(name, parameters=draw(object_schemas())) for name in names]


@given(tools=tool_sets(), parallel=st.booleans(), prompt=plain_prompts, data=st.data())
def test_forced_tool_calls_are_calls_of_given_tools_with_valid_arguments(
    guard, tools, parallel, prompt, data
):
    by_name = {tool.name: tool for tool in tools}
    named = data.draw(st.sampled_from([None, *by_name]))
    choice = named or data.draw(st.sampled_from(["required", "any", True]))
    offered = [by_name[named]] if named else tools
    result = guard.generate(
        [{"role": "user", "content": prompt}],
        tools=tools,
        tool_choice=choice,
        parallel_tool_calls=parallel,
        **data.draw(search_settings()),
    )
    # One call: the markers, optional newlines inside them, the call's JSON object.
    longest = float("inf")
    if not parallel:
        longest = len("<tool_call>\n\n</tool_call>") + max(
            len(f'{{"name": {json.dumps(t.name)}, "arguments": }}')
            + longest_json(t.parameters, t.parameters, strict=True)
            for t in offered
        )
    if not _ended(result, longest):
        return
    parsed = parse_tool_calls(result.text, tools)
    assert parsed.content == "" and not parsed.invalid_tool_calls, result.text
    assert parsed.tool_calls and (parallel or len(parsed.tool_calls) == 1)
    for call in parsed.tool_calls:
        assert call.name in {t.name for t in offered}
        jsonschema.validate(call.arguments, by_name[call.name].parameters)


@given(regex=regexes(), prompt=plain_prompts, data=st.data())
def test_regex_responses_match_whole(guard, regex, prompt, data):
    pattern, longest = regex
    result = guard.generate(
        prompt,
        response_format={"type": "regex", "pattern": pattern},
        **data.draw(search_settings()),
    )
    if _ended(result, longest):
        assert re.fullmatch(pattern, result.text), (pattern, result.text)
