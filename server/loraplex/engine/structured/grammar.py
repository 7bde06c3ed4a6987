"""The grammar library, wrapped: the only module that imports llguidance (chosen by measurement,
see benchmarks/results/structured_output_cpu.md: the fastest schema compilation of the three
candidates, a context-free grammar engine, no dependencies).

    vocab = GrammarVocab.from_hf(tokenizer, vocab_size, eos_ids)   # once per server (~1-3 s)
    compiled = compile_constraint(vocab, constraint)               # per schema (ms), cacheable
    m = compiled.matcher()                                         # per sequence (a cheap copy)
    m.fill_mask(bitmask_row); m.advance(token); m.stopped

llguidance never raises for a bad grammar: it builds a matcher in an error state. That state is
turned into InvalidRequestError here, with the library's reason and the request's field.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any, Iterable

import llguidance
import llguidance.hf
from llguidance.gbnf_to_lark import any_to_lark

from loraplex.engine.request import InvalidRequestError
from loraplex.engine.structured.spec import Constraint, Kind

# Compact JSON: no free whitespace between tokens. With flexible whitespace a model can emit
# newlines forever inside a structure (vLLM grew --disable-any-whitespace for that); compact
# output also costs fewer tokens.
_JSON_OPTIONS = {"whitespace_flexible": False}


def mask_words(vocab_size: int) -> int:
    """int32 words of one row of the allowed-token bitmask (bit t of word t // 32 = token t)."""
    return (vocab_size + 31) // 32


@dataclass(frozen=True)
class GrammarVocab:
    """The tokenizer as the grammar library sees it (token bytes, EOS ids); built once."""

    tokenizer: Any  # llguidance.LLTokenizer
    vocab_size: int  # the model's logits width (may exceed the tokenizer's)

    @staticmethod
    def from_hf(hf_tokenizer: Any, vocab_size: int, eos_token_ids: Iterable[int]) -> "GrammarVocab":
        tok = llguidance.hf.from_tokenizer(hf_tokenizer, n_vocab=vocab_size,
                                           eos_token=sorted(eos_token_ids) or None)
        return GrammarVocab(tok, vocab_size)


def _choice_grammar(choices: tuple[str, ...]) -> str:
    # Lark string literals take JSON's escapes, so json.dumps quotes any choice safely.
    return "start: " + " | ".join(json.dumps(c) for c in choices)


def grammar_text(c: Constraint) -> str:
    """The llguidance grammar (its JSON form) for a constraint. Raises InvalidRequestError for
    what can be refused before compiling (a grammar that is neither Lark nor GBNF)."""
    if c.kind is Kind.JSON_SCHEMA:
        return llguidance.LLMatcher.grammar_from_json_schema(c.text, defaults=_JSON_OPTIONS)
    if c.kind is Kind.JSON_OBJECT:
        return llguidance.LLMatcher.grammar_from_json_schema({"type": "object"}, defaults=_JSON_OPTIONS)
    if c.kind is Kind.REGEX:
        try:  # llguidance's dialect is Rust's; Python's compiler catches most typos with a clearer message
            re.compile(c.text)
        except re.error as exc:
            raise InvalidRequestError(c.field, f"invalid regular expression: {exc}") from None
        return llguidance.LLMatcher.grammar_from_regex(c.text)
    if c.kind is Kind.CHOICE:
        return llguidance.LLMatcher.grammar_from_lark(_choice_grammar(c.choices))
    try:
        lark = any_to_lark(c.text)  # GBNF (llama.cpp, xgrammar) is converted; Lark passes through
    except Exception as exc:  # the converter raises plain exceptions with a position
        raise InvalidRequestError(c.field, f"invalid grammar: {exc}") from None
    return llguidance.LLMatcher.grammar_from_lark(lark)


class Matcher:
    """One sequence's position in its grammar. Not thread-safe: the engine thread advances it and
    the mask worker reads it, never at the same time (the step waits for the masks first)."""

    __slots__ = ("_m",)

    def __init__(self, m: Any):
        self._m = m

    def fill_mask(self, row_ptr: int, row_bytes: int) -> None:
        """Write the allowed-token bitmask into row_bytes of memory at row_ptr (an int32 tensor
        row). Releases the GIL while it works."""
        self._m.unsafe_compute_mask_ptr(row_ptr, row_bytes)

    def advance(self, token: int) -> bool:
        """Consume an accepted token; False if the grammar does not allow it (error state)."""
        return self._m.consume_token(token)

    @property
    def stopped(self) -> bool:
        """The structure is complete and nothing (not even more optional content) may follow."""
        return self._m.is_stopped()

    @property
    def error(self) -> str:
        return self._m.get_error() if self._m.is_error() else ""


@dataclass(frozen=True)
class CompiledGrammar:
    """A constraint compiled for one tokenizer: a matcher in its initial state, never advanced,
    copied for every sequence that uses it."""

    constraint: Constraint
    _template: Any  # llguidance.LLMatcher

    def matcher(self) -> Matcher:
        return Matcher(self._template.deep_copy())


def compile_constraint(vocab: GrammarVocab, c: Constraint) -> CompiledGrammar:
    """Build (and check) the grammar. Slow for large schemas: call it off the engine thread.
    llguidance releases the GIL while it builds, so a compile in a worker does not stall Python."""
    try:
        text = grammar_text(c)
    except ValueError as exc:  # e.g. a schema that is not a JSON object
        if isinstance(exc, InvalidRequestError):
            raise
        raise InvalidRequestError(c.field, str(exc)) from None
    m = llguidance.LLMatcher(vocab.tokenizer, text, log_level=0)
    if not m.is_error():
        # The lexer is built lazily: the first mask does that work here, in the compile thread and
        # under its timeout, instead of in the first engine step; the per-sequence copies share it.
        m.compute_bitmask()
    if m.is_error():
        raise InvalidRequestError(c.field, _reason(m.get_error()))
    return CompiledGrammar(c, m)


def _reason(error: str) -> str:
    # llguidance's first line is the reason ("at 1(8): unknown name: ..."); the next ones quote the
    # grammar with a caret under the position.
    lines = [ln.strip() for ln in error.strip().splitlines() if ln.strip()]
    return lines[0] if lines else "invalid"
