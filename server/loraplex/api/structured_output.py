"""Structured output in requests: the gRPC `structured_output` field and the OpenAI body fields ->
an engine Constraint (engine/structured/spec.py), and its compilation before submit.

OpenAI / vLLM fields (either route; at most one of them per request, 400 naming the second):

    response_format   {"type": "json_object"} | {"type": "json_schema", "json_schema": {"name",
                      "schema", "strict", "description"}} | {"type": "text"} (= none)
    guided_json       a schema (object or JSON string)          vLLM's extensions, also inside
    guided_regex      a regular expression                      `structured_outputs` as {"json",
    guided_choice     a list of strings                         "regex", "choice", "grammar",
    guided_grammar    a Lark or GBNF grammar                    "json_object"} (vLLM >= 0.10)

Errors name the body field ("response_format.json_schema.schema: ...", "guided_regex: ...").
"""

from __future__ import annotations

from typing import Any

from loraplex.engine.request import InvalidRequestError, Request
from loraplex.engine.structured.spec import Constraint, Kind

# --- gRPC ----------------------------------------------------------------------------------------


def constraint_from_proto(req: Any) -> Constraint | None:
    """GenerateRequest.structured_output -> Constraint (None when unset)."""
    if not req.HasField("structured_output"):
        return None
    so = req.structured_output
    which = so.WhichOneof("kind")
    field = f"structured_output.{which}"
    if which is None:
        raise InvalidRequestError("structured_output", "set one of json_schema, json_object, regex, "
                                                       "choice or grammar")
    if which == "json_object":
        if not so.json_object:
            raise InvalidRequestError(field, "must be true when set (leave structured_output unset for free text)")
        return Constraint(Kind.JSON_OBJECT, field=field)
    if which == "choice":
        return Constraint(Kind.CHOICE, choices=tuple(so.choice.choices), field="structured_output.choice.choices")
    kind = {"json_schema": Kind.JSON_SCHEMA, "regex": Kind.REGEX, "grammar": Kind.GRAMMAR}[which]
    return Constraint(kind, getattr(so, which), field=field)


# --- OpenAI HTTP ---------------------------------------------------------------------------------
OPENAI_FIELDS = frozenset({"response_format", "guided_json", "guided_regex", "guided_choice",
                           "guided_grammar", "structured_outputs"})


def json_type_name(v: Any) -> str:
    """The JSON type of a parsed body value, as errors name it ("null", "object", "integer", ...)."""
    return "null" if v is None else {bool: "boolean", int: "integer", float: "number", str: "string",
                                     dict: "object", list: "array"}.get(type(v), type(v).__name__)


def _string(v: Any, field: str) -> str:
    if not isinstance(v, str):
        raise InvalidRequestError(field, f"expected a string, got {json_type_name(v)}")
    return v


def _choices(v: Any, field: str) -> Constraint:
    if not isinstance(v, list) or not all(isinstance(c, str) for c in v):
        raise InvalidRequestError(field, f"expected a list of strings, got {json_type_name(v)}")
    return Constraint(Kind.CHOICE, choices=tuple(v), field=field)


def _response_format(v: Any) -> Constraint | None:
    if not isinstance(v, dict):
        raise InvalidRequestError("response_format", f"expected an object, got {json_type_name(v)}")
    kind = v.get("type")
    extra = set(v) - {"type", "json_schema"}
    if extra:
        raise InvalidRequestError(f"response_format.{sorted(extra)[0]}", "unknown field")
    if kind == "text":
        return None
    if kind == "json_object":
        return Constraint(Kind.JSON_OBJECT, field="response_format")
    if kind != "json_schema":
        raise InvalidRequestError("response_format.type", f"expected \"text\", \"json_object\" or "
                                                          f"\"json_schema\", got {kind!r}")
    spec = v.get("json_schema")
    if not isinstance(spec, dict):
        raise InvalidRequestError("response_format.json_schema", f"expected an object, got {json_type_name(spec)}")
    extra = set(spec) - {"name", "schema", "strict", "description"}
    if extra:
        raise InvalidRequestError(f"response_format.json_schema.{sorted(extra)[0]}", "unknown field")
    if "schema" not in spec:
        raise InvalidRequestError("response_format.json_schema.schema", "required")
    # `strict` is accepted either way: every constraint here is enforced strictly.
    return Constraint.json_schema(spec["schema"], "response_format.json_schema.schema")


def _structured_outputs(v: Any) -> Constraint | None:
    if not isinstance(v, dict):
        raise InvalidRequestError("structured_outputs", f"expected an object, got {json_type_name(v)}")
    set_keys = [k for k, x in v.items() if x is not None and x is not False]
    for k in set_keys:
        if k not in ("json", "regex", "choice", "grammar", "json_object"):
            raise InvalidRequestError(f"structured_outputs.{k}", "not supported by this server")
    if len(set_keys) > 1:
        raise InvalidRequestError(f"structured_outputs.{set_keys[1]}",
                                  f"only one constraint per request (already got {set_keys[0]})")
    if not set_keys:
        return None
    k = set_keys[0]
    field = f"structured_outputs.{k}"
    if k == "json":
        return Constraint.json_schema(v[k], field)
    if k == "json_object":
        if v[k] is not True:
            raise InvalidRequestError(field, f"expected true, got {v[k]!r}")
        return Constraint(Kind.JSON_OBJECT, field=field)
    if k == "choice":
        return _choices(v[k], field)
    return Constraint(Kind.REGEX if k == "regex" else Kind.GRAMMAR, _string(v[k], field), field=field)


def constraint_from_openai(body: dict) -> Constraint | None:
    """The request's constraint from whichever of OPENAI_FIELDS it set (null = unset)."""
    found: list[tuple[str, Constraint | None]] = []
    for name in ("response_format", "guided_json", "guided_regex", "guided_choice", "guided_grammar",
                 "structured_outputs"):
        v = body.get(name)
        if v is None:
            continue
        if name == "response_format":
            c = _response_format(v)
        elif name == "structured_outputs":
            c = _structured_outputs(v)
        elif name == "guided_json":
            c = Constraint.json_schema(v, name)
        elif name == "guided_choice":
            c = _choices(v, name)
        else:
            c = Constraint(Kind.REGEX if name == "guided_regex" else Kind.GRAMMAR, _string(v, name), field=name)
        if c is not None:
            found.append((name, c))
    if len(found) > 1:
        raise InvalidRequestError(found[1][0], f"only one constraint per request (already got {found[0][0]})")
    return found[0][1] if found else None


# --- before submit -------------------------------------------------------------------------------
async def compile_all(engine: Any, requests: list[Request]) -> None:
    """Compile every request's constraint in the engine's grammar compiler (its own thread,
    bounded in time; cached, so n choices with one schema compile once). Raises
    InvalidRequestError naming the field for a constraint that is invalid, too large or too slow."""
    for req in requests:
        if req.constraint is not None and req.grammar is None:
            req.grammar = await engine.grammars.compile_async(req.constraint)
