"""Bad tool arguments, said in one sentence: which argument, what was given, what is allowed.

FastMCP validates arguments with pydantic before a tool runs and returns pydantic's report as it is ("1 validation
error for call[generate]\\nmax_new_tokens\\n  Input should be greater than or equal to 1 [type=..." plus a link).
This middleware turns that into "max_new_tokens is 0; it must be a whole number from 1 to 8192", taking what is
allowed from the tool's own JSON schema (the one the host sees), and logs the same sentence.
"""

from __future__ import annotations

import logging
import math

from fastmcp.exceptions import ToolError
from fastmcp.exceptions import ValidationError as ArgumentValidationError
from fastmcp.server.middleware import Middleware, MiddlewareContext
from pydantic import ValidationError

log = logging.getLogger(__name__)

_SHOWN_CHARS = 40


def describe_invalid_arguments(error: ValidationError, schema: dict) -> str:
    """One sentence about the first invalid argument of a call, given the tool's input JSON schema."""
    first = error.errors()[0]
    location = [str(part) for part in first["loc"]]
    name = ".".join(location) if location else "the arguments"
    properties = schema.get("properties", {})
    allowed = _allowed(properties[location[0]], schema) if len(location) == 1 and location[0] in properties else None
    if allowed is None:  # nested (a message's role) or unknown: pydantic's own words, as a clause
        message = first["msg"]
        allowed = message[0].lower() + message[1:] if message else "valid"
        if first["type"] == "missing":
            return f"{name} is missing; it is required"
        return f"{name} is {_shown(first.get('input'))}; {allowed}"
    if first["type"] == "missing":
        return f"{name} is missing; it is required and must be {allowed}"
    return f"{name} is {_shown(first.get('input'))}; it must be {allowed}"


def _allowed(prop: dict, schema: dict) -> str | None:
    """What the schema allows, in words: 'a whole number from 1 to 8192', 'text of at most 200 characters' ..."""
    if "$ref" in prop:
        prop = schema.get("$defs", {}).get(prop["$ref"].rsplit("/", 1)[-1], prop)
    options = [option for option in prop.get("anyOf", []) if option.get("type") != "null"]
    nullable = len(options) < len(prop.get("anyOf", []))
    if options:
        words = " or ".join(filter(None, (_allowed(option, schema) for option in options)))
        return f"{words} (or left out)" if nullable else words
    if "enum" in prop:
        return "one of: " + ", ".join(str(value) for value in prop["enum"])
    if "const" in prop:
        return repr(prop["const"])
    kind = prop.get("type")
    if kind in ("integer", "number"):
        return ("a whole number" if kind == "integer" else "a finite number") + _range(prop)
    if kind == "string":
        text = "text" + _length(prop, "Length", "character")
        return text + (f" matching {prop['pattern']}" if "pattern" in prop else "")
    if kind == "array":
        return "a list" + _length(prop, "Items", "item")
    if kind == "boolean":
        return "true or false"
    if kind == "object":
        return "an object"
    return None


def _range(prop: dict) -> str:
    low, high = prop.get("minimum"), prop.get("maximum")
    if low is not None and high is not None:
        return f" from {_number(low)} to {_number(high)}"
    words = []
    if low is not None:
        words.append(f"at least {_number(low)}")
    elif "exclusiveMinimum" in prop:
        words.append(f"greater than {_number(prop['exclusiveMinimum'])}")
    if high is not None:
        words.append(f"at most {_number(high)}")
    elif "exclusiveMaximum" in prop:
        words.append(f"less than {_number(prop['exclusiveMaximum'])}")
    return " " + " and ".join(words) if words else ""


def _length(prop: dict, suffix: str, unit: str) -> str:
    low, high = prop.get(f"min{suffix}"), prop.get(f"max{suffix}")
    if low and high is not None:
        return f" of {low:,} to {high:,} {unit}s"
    if high is not None:
        return f" of at most {high:,} {unit}s"
    if low:
        return f" of at least {low:,} {unit}{'s' if low > 1 else ''}"
    return ""


def _number(value: float) -> str:
    return f"{value:,}" if isinstance(value, int) else f"{value:g}"


def _shown(value: object) -> str:
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, str):
        return repr(value) if len(value) <= _SHOWN_CHARS else f"a text of {len(value):,} characters"
    if isinstance(value, list):
        return f"a list of {len(value):,} items" if len(repr(value)) > _SHOWN_CHARS else repr(value)
    if isinstance(value, dict):
        return "an object" if len(repr(value)) > _SHOWN_CHARS else repr(value)
    return "null" if value is None else repr(value)


class OneSentenceArgumentErrors(Middleware):
    """Replaces FastMCP's argument-validation reports with describe_invalid_arguments' sentence."""

    async def on_call_tool(self, context: MiddlewareContext, call_next):
        try:
            return await call_next(context)
        except ArgumentValidationError as error:
            cause = error.__cause__
            if not isinstance(cause, ValidationError) or context.fastmcp_context is None:
                raise
            tool = await context.fastmcp_context.fastmcp.get_tool(context.message.name)
            sentence = describe_invalid_arguments(cause, tool.parameters if tool is not None else {})
            log.warning("invalid arguments for %s: %s", context.message.name, sentence)
            raise ToolError(sentence) from None
