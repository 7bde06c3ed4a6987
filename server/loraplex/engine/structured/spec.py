"""What a request asks its output to match: the library-independent description of a constraint.

A `Constraint` is pure data and hashable: (kind, text) is the key of the compiled-grammar cache, so
two requests with the same schema share one compilation. `field` is where the request carried it
("structured_output.json_schema", "response_format.json_schema.schema", "guided_regex", ...): every
error about it names that field, and it is not part of the key.
"""

from __future__ import annotations

import enum
import json
from dataclasses import dataclass, field

from loraplex.engine.request import InvalidRequestError


class Kind(enum.Enum):
    JSON_SCHEMA = "json_schema"  # text: the schema as JSON
    JSON_OBJECT = "json_object"  # any JSON object; text ""
    REGEX = "regex"  # text: the whole output must match it (full match)
    CHOICE = "choice"  # choices: the output is exactly one of them
    GRAMMAR = "grammar"  # text: a Lark (or GBNF) context-free grammar


@dataclass(frozen=True)
class Constraint:
    kind: Kind
    text: str = ""
    choices: tuple[str, ...] = ()
    field: str = field(default="structured_output", compare=False)

    def __post_init__(self) -> None:
        if self.kind is Kind.CHOICE:
            if not self.choices:
                raise InvalidRequestError(self.field, "must hold at least one choice")
            if any(not c for c in self.choices):
                raise InvalidRequestError(self.field, "choices must be non-empty strings")
        elif self.kind is Kind.JSON_OBJECT:
            pass
        elif not self.text.strip():
            raise InvalidRequestError(self.field, "must not be empty")
        if self.kind is Kind.JSON_SCHEMA:
            try:
                schema = json.loads(self.text)
            except ValueError as exc:
                raise InvalidRequestError(self.field, f"not valid JSON: {exc}") from None
            if not isinstance(schema, (dict, bool)):
                raise InvalidRequestError(self.field, f"a JSON schema is an object or a boolean, "
                                                      f"got {type(schema).__name__}")

    @property
    def size(self) -> int:
        """Bytes of user text the compiler will read (checked against the server's limit)."""
        return len(self.text.encode()) + sum(len(c.encode()) for c in self.choices)

    def check_size(self, max_bytes: int) -> None:
        if self.size > max_bytes:
            raise InvalidRequestError(self.field, f"{self.size} bytes; at most {max_bytes} "
                                                  f"(--structured-output-max-bytes)")

    @staticmethod
    def json_schema(schema: object, field: str) -> "Constraint":
        """From a schema given as a JSON string or an already-parsed object (HTTP bodies)."""
        if isinstance(schema, str):
            return Constraint(Kind.JSON_SCHEMA, schema, field=field)
        if not isinstance(schema, (dict, bool)):
            raise InvalidRequestError(field, f"a JSON schema is an object, got {type(schema).__name__}")
        # Key order kept: the generated object lists its properties in the schema's order.
        return Constraint(Kind.JSON_SCHEMA, json.dumps(schema), field=field)
