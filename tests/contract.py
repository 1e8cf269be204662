"""Request bodies drawn from the JSON Schemas of the request contract
(ingest/contract.py), for the tests of the contract and of the edge."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from hypothesis import strategies as st
from hypothesis_jsonschema import from_schema

from ingest.contract import schemas

SCHEMAS = schemas()


def from_object_schema(schema: Mapping[str, Any]) -> st.SearchStrategy[dict[str, Any]]:
    """Objects of schema, property by property: hypothesis-jsonschema's object
    strategy fails with this Hypothesis ('many' object has no attribute 'more')."""
    properties, required = schema["properties"], set(schema["required"])
    return st.fixed_dictionaries(
        {name: from_schema(properties[name]) for name in properties if name in required},
        optional={
            name: from_schema(properties[name]) for name in properties if name not in required
        },
    )


ballots = from_object_schema(SCHEMAS["Ballot"])
voter_ids = from_schema(SCHEMAS["Ballot"]["properties"]["user_id"]).filter(lambda v: v is not None)
new_polls = from_object_schema(SCHEMAS["NewPoll"])
