"""The fast payload validator never accepts what jsonschema refuses, for every declared schema.

`server/edge/schemas.validate` accepts a payload when the generated validator (fastjsonschema)
does, and asks jsonschema otherwise. That is only right if the generated one is never the looser of
the two: this test generates payloads from each command's and REST body's schema (valid ones,
boundary values, wrong types, integral floats, unknown fields) and checks both verdicts.
"""

from __future__ import annotations

import random
import string
from typing import Any

import pytest

from server.core.errors import InvalidPayload
from server.edge.schemas import PayloadValidator, compile_schema, validate
from tests.test_apidocs import docs_client, fetch_json  # noqa: F401 - the fixture

PAYLOADS_PER_SCHEMA = 300


def declared_schemas(asyncapi: dict, openapi: dict) -> dict[str, dict]:
    """Every command payload and JSON body schema in the API documents, by a readable name."""
    found = {}
    for channel, spec in asyncapi["channels"].items():
        for name, message in spec["messages"].items():
            payload = message.get("payload", {})
            if "$ref" not in payload:
                found[f"{channel} {name}"] = payload
    for path, operations in openapi["paths"].items():
        for method, operation in operations.items():
            body = operation.get("requestBody", {}).get("content", {}).get("application/json")
            if body is not None:
                found[f"{method.upper()} {path}"] = body["schema"]
    return found


def sample(schema: Any, rng: random.Random, depth: int = 0) -> Any:
    """A payload shaped by the schema, valid or nearly so (bounds, types, fields are bent at random)."""
    if not isinstance(schema, dict) or depth > 6 or rng.random() < 0.04:
        return rng.choice([None, True, 0, 1.0, 5.0, -1, "", "x", [], {}, 2**63, 1e300])
    for branch_key in ("oneOf", "anyOf"):
        if branch_key in schema:
            return sample(rng.choice(schema[branch_key]), rng, depth + 1)
    if "const" in schema:
        return schema["const"] if rng.random() < 0.9 else "other"
    if "enum" in schema:
        return rng.choice(schema["enum"]) if rng.random() < 0.9 else "not-in-enum"
    kind = schema.get("type")
    if isinstance(kind, list):
        kind = rng.choice(kind)
    if kind == "object" or "properties" in schema:
        properties = schema.get("properties", {})
        required = set(schema.get("required", ()))
        payload = {name: sample(inner, rng, depth + 1) for name, inner in properties.items()
                   if name in required or rng.random() < 0.6}
        if rng.random() < 0.05:
            payload["unknown_field"] = 1
        return payload
    if kind == "array":
        count = rng.randint(schema.get("minItems", 0), min(schema.get("maxItems", 4), 4))
        return [sample(schema.get("items", {}), rng, depth + 1) for _ in range(count)]
    if kind in ("integer", "number"):
        low, high = schema.get("minimum", -10), schema.get("maximum", 10**6)
        value = rng.choice([low, high, low - 1, high + 1, rng.randint(int(low), int(high))])
        return float(value) if kind == "number" or rng.random() < 0.15 else value
    if kind == "boolean":
        return rng.random() < 0.5
    if kind == "null":
        return None
    if kind == "string":
        if schema.get("format") == "uuid" or "[0-9a-fA-F]{8}" in schema.get("pattern", ""):
            return rng.choice(["2b9c3c7e-2f4b-4c1e-9a44-0a5d1b7e9f10", "not-a-uuid",
                               "2B9C3C7E-2F4B-4C1E-9A44-0A5D1B7E9F1"])
        low, high = schema.get("minLength", 0), min(schema.get("maxLength", 40), 300)
        length = rng.choice([low, high, max(0, low - 1), high + 1, rng.randint(low, max(low, high))])
        alphabet = rng.choice([string.ascii_lowercase, string.digits + ".", string.printable, "é😀\t\n"])
        return "".join(rng.choice(alphabet) for _ in range(length))
    return rng.choice([None, 1, "x", {}, []])


def verdict(validator: PayloadValidator, payload: Any) -> bool:
    """Whether `validate` accepts the payload."""
    try:
        validate(validator, payload)
        return True
    except InvalidPayload:
        return False


async def test_the_fast_validator_is_never_looser_than_jsonschema(docs_client):  # noqa: F811
    schemas = declared_schemas(await fetch_json(docs_client, "/api/v1/asyncapi.json"),
                               await fetch_json(docs_client, "/api/v1/openapi.json"))
    assert len(schemas) > 100  # every command and body, not a handful
    rng = random.Random(20261204)
    accepted_somewhere = 0
    for name, schema in schemas.items():
        validator = compile_schema(schema)
        accepted = 0
        for _ in range(PAYLOADS_PER_SCHEMA):
            payload = sample(schema, rng)
            expected = validator.full.is_valid(payload)
            assert verdict(validator, payload) == expected, (name, payload)
            accepted += expected
        accepted_somewhere += accepted > 0
    # The generator reaches the accepting side for most schemas, so the check above is not vacuous.
    assert accepted_somewhere > 0.8 * len(schemas)


@pytest.mark.parametrize("payload", [{"session_id": 5.0, "seq": 1, "reward_type": "coin", "value": "1"},
                                     {"session_id": 5, "seq": 1.0, "reward_type": "coin", "value": "1"},
                                     {"session_id": 5, "seq": 1, "reward_type": "coin", "value": 2.0}])
def test_an_integral_float_goes_to_jsonschema_and_is_refused(payload):
    from handlers.games import REPORT_SCHEMA

    validator = compile_schema(REPORT_SCHEMA)
    with pytest.raises(Exception):
        validator.accepts({"session_id": "5"})  # the fast one refuses a string id itself
    validator.accepts(payload)  # the generated code takes 5.0 for an integer...
    with pytest.raises(InvalidPayload):
        validate(validator, payload)  # ...which validate never lets it decide
