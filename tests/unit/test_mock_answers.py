"""What the mock upstream generates for a request, decided without a server."""

from __future__ import annotations

import orjson
from hypothesis import given
from hypothesis import strategies as st

from poolgate.mock.responses import schema_readable, tool_input

JSONISH = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=20,
)
KEYWORDS = st.sampled_from(["type", "properties", "required", "enum", "items"])
SCHEMA = st.recursive(
    JSONISH,
    lambda inner: (
        st.dictionaries(KEYWORDS | st.text(max_size=4), inner, max_size=5)
        | st.dictionaries(st.text(max_size=4), inner, max_size=3).map(lambda props: {"properties": props})
        | st.lists(st.text(max_size=4) | inner, max_size=3).map(lambda names: {"required": names})
    ),
    max_leaves=30,
)


@given(SCHEMA)
def test_a_forced_tool_call_never_fails_whatever_its_schema(schema: object) -> None:
    """The mock answers a schema the API takes with a call, and never fails on one it refuses (a 500 took
    the pool down): the server answers those 400 (`schema_readable`)."""
    tool = {"name": "t", "input_schema": schema}
    call = tool_input(tool)
    orjson.dumps(call)
    if schema_readable(schema) and isinstance(schema, dict):
        assert set(call) == set(schema.get("required", []))


def test_a_type_list_takes_the_first_types_placeholder() -> None:
    properties = {"a": {"type": ["string", "null"]}, "b": {"type": ["null", "integer"]}, "c": {"enum": [3]}}
    schema = {"type": "object", "properties": properties, "required": ["a", "b", "c"]}
    assert schema_readable(schema)
    assert tool_input({"name": "t", "input_schema": schema}) == {"a": "mock", "b": None, "c": 3}
