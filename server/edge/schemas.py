"""Payload validation with JSON Schema: handlers declare a schema, the dispatcher validates first."""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import fastjsonschema
import jsonschema
from jsonschema import Draft202012Validator

from server.core import wallets
from server.core.errors import InvalidPayload
from server.core.protocol import DEFAULT_PAGE, MAX_INTEGER_ID, MAX_PAGE  # noqa: F401 - the handlers' vocabulary

_FORMATS = Draft202012Validator.FORMAT_CHECKER
# Formats the generated validator does not know; where it is stricter than jsonschema, jsonschema decides.
_FAST_FORMATS = {"uuid": r"^[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}$"}
# JSON Schema counts 5.0 as an integer, and orjson parses integers past 64 bits as floats: either
# would reach PostgreSQL as a float where it wants an int. Only a real int is an integer here.
_Validator = jsonschema.validators.extend(Draft202012Validator, type_checker=Draft202012Validator.TYPE_CHECKER.redefine(
    "integer", lambda _checker, value: isinstance(value, int) and not isinstance(value, bool)))


def _unbounded_integer(schema: Any, path: str = "$") -> str | None:
    """The path of the first integer schema without a maximum (a value the database cannot hold)."""
    if isinstance(schema, dict):
        types = schema.get("type")
        if (types == "integer" or (isinstance(types, list) and "integer" in types)) and "maximum" not in schema:
            return path
        for key, inner in schema.items():
            found = _unbounded_integer(inner, f"{path}.{key}")
            if found is not None:
                return found
    elif isinstance(schema, list):
        for index, inner in enumerate(schema):
            found = _unbounded_integer(inner, f"{path}[{index}]")
            if found is not None:
                return found
    return None


@dataclasses.dataclass(frozen=True, slots=True)
class PayloadValidator:
    """A schema's two validators: generated code that accepts a valid payload in a few microseconds,
    and jsonschema, which decides every payload the fast one does not accept and names the error."""

    schema: dict[str, Any]
    accepts: Callable[[Any], Any]
    full: Draft202012Validator

    def is_valid(self, payload: Any) -> bool:
        """Whether the payload matches (jsonschema's answer)."""
        return self.full.is_valid(payload)


def compile_schema(schema: dict[str, Any]) -> PayloadValidator:
    """Check a schema once at import time and return its validator."""
    Draft202012Validator.check_schema(schema)
    # An unbounded integer reaches PostgreSQL as a value out of range and comes back as a 500.
    unbounded = _unbounded_integer(schema)
    if unbounded is not None:
        raise ValueError(f"integer schema without a maximum at {unbounded}")
    # jsonschema walks a payload at about 40 us per command, more than the rest of a reward report's
    # handling; the generated validator is 15x faster. Where the two could disagree (it counts 5.0
    # as an integer), `validate` leaves the payload to jsonschema.
    return PayloadValidator(schema, fastjsonschema.compile(schema, formats=_FAST_FORMATS),
                            _Validator(schema, format_checker=_FORMATS))


def _first_suspect(value: Any) -> tuple[str, str] | None:
    """The path of the first string (or key) holding a NUL character, which PostgreSQL cannot store,
    ("nul", path); else of the first float with an integral value, ("float", path), which only
    jsonschema judges right against an integer schema; None when there is neither."""
    if isinstance(value, str):
        return ("nul", "") if "\x00" in value else None
    if isinstance(value, float):
        return ("float", "") if value.is_integer() else None
    if isinstance(value, dict):
        children = ((str(key), inner) for key, inner in value.items())
    elif isinstance(value, list):
        children = ((str(index), inner) for index, inner in enumerate(value))
    else:
        return None
    suspect = None
    for name, inner in children:
        if "\x00" in name:  # a key (an index never holds one)
            return "nul", name
        found = _first_suspect(inner)
        if found is not None:
            # Paths are built on the way out, for the one suspect found: every event passes here.
            found = (found[0], f"{name}.{found[1]}" if found[1] else name)
            if found[0] == "nul":
                return found
            suspect = suspect or found
    return suspect


def validate(validator: PayloadValidator, payload: Any) -> Any:
    """Return the payload if it matches, else raise InvalidPayload naming the first bad field."""
    suspect = _first_suspect(payload)
    if suspect is not None and suspect[0] == "nul":
        raise InvalidPayload("text must not contain NUL characters", field=suspect[1] or None)
    if suspect is None:
        try:
            validator.accepts(payload)
            return payload
        except fastjsonschema.JsonSchemaValueException:
            pass  # jsonschema names the error below
    error = jsonschema.exceptions.best_match(validator.full.iter_errors(payload))
    if error is None:
        return payload
    path = ".".join(str(part) for part in error.absolute_path)
    if error.validator == "required" and isinstance(error.instance, dict):
        missing = next((name for name in error.validator_value if name not in error.instance), None)
        field = f"{path}.{missing}" if path and missing else (missing or path)
        raise InvalidPayload(f"'{missing}' is required", field=field)
    if error.validator == "additionalProperties":
        extra = sorted(set(error.instance) - set(error.schema.get("properties", {})))
        name = extra[0] if extra else path
        raise InvalidPayload(f"unknown field '{name}'", field=f"{path}.{name}" if path else name)
    # jsonschema messages quote the offending value; keep them short and never echo long input.
    message = error.message if len(error.message) <= 200 else error.message[:200] + "..."
    raise InvalidPayload(message, field=path or None)


def obj(properties: dict[str, Any], required: tuple[str, ...] = (), **extra: Any) -> dict[str, Any]:
    """An object schema that refuses unknown fields."""
    return {"type": "object", "properties": properties, "required": list(required),
            "additionalProperties": False, **extra}


def string(min_length: int = 1, max_length: int = 255, **extra: Any) -> dict[str, Any]:
    """A bounded string schema."""
    return {"type": "string", "minLength": min_length, "maxLength": max_length, **extra}


UUID = {"type": "string", "format": "uuid",
        "pattern": "^[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}$"}

PAGE_LIMIT = {"type": "integer", "minimum": 1, "maximum": MAX_PAGE}

# PostgreSQL text cannot hold NUL, and control characters have no place in paths or names.
_PRINTABLE = "^[^\\u0000-\\u001f\\u007f]+$"


def text(max_length: int = 255) -> dict[str, Any]:
    """A bounded single-line string schema."""
    return string(1, max_length, pattern=_PRINTABLE)


# Accounts: registration and profile edits validate usernames and passwords alike.
USERNAME = string(3, 50, pattern="^[A-Za-z0-9_.-]+$")
PASSWORD = string(8, 128)
EMAIL = string(3, 255, format="email", pattern="^[^@\\s]+@[^@\\s]+\\.[^@\\s]+$")


def update_schema(properties: dict[str, Any]) -> dict[str, Any]:
    """A PATCH body: any of these fields, at least one."""
    return obj(properties, minProperties=1)


# The KVP chain's words (DAO votes, NFT prices and game payloads use them too).
INTEGER_ID = {"type": "integer", "minimum": 1, "maximum": MAX_INTEGER_ID}
COUNT = {"type": "integer", "minimum": 0, "maximum": MAX_INTEGER_ID}  # a height, a sequence number
KVP_ADDRESS = string(44, 44, pattern=wallets.ADDRESS_RE.pattern)
KVP_AMOUNT = {"type": "string", "pattern": "^[0-9]{1,12}(\\.[0-9]{1,8})?$"}
KVP_SIGNATURE = string(128, 128, pattern=wallets.SIGNATURE_RE.pattern)
TX_HASH = string(64, 64, pattern="^[0-9a-f]{64}$")
