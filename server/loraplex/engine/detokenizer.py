"""Token ids -> streamed text, stop strings, and the finish decision of each generated token.

Incremental decoding: decoding one token alone is wrong for byte-level BPE (a character may span
several tokens) and for SentencePiece (leading spaces depend on the previous token). So each step
decodes a short window of ids twice — up to the last emitted point and up to the new token — and
emits the difference. When the newest text ends in U+FFFD (an incomplete UTF-8 sequence) nothing is
emitted until a later token completes it.

Stop strings: text is released only when it cannot be the beginning of a stop string. When a stop
string appears (possibly spread over several tokens) the text is cut right before it, the stop
string itself is never emitted, and the sequence finishes with STOP.
"""

from __future__ import annotations

from collections.abc import Sequence as Seq
from typing import Any

from loraplex.engine.request import FinishReason, SamplingParams

# Prompt tokens kept as decoding context so the first generated token gets its leading space right.
_PREFIX_CONTEXT_TOKENS = 5


def backend_decode(tokenizer: Any) -> Any:
    """The tokenizer's own Rust `decode(ids, skip_special_tokens=...)` when transformers' `decode`
    (with clean_up_tokenization_spaces=False) is exactly that call: a TokenizersBackend whose
    decode / _decode no subclass overrides. None otherwise (the caller keeps tokenizer.decode).
    Two decodes a generated token through transformers' wrapper (argument conversion, kwargs) cost
    ~20 us against ~5 for the Rust calls alone: ~0.5 ms of a 32-sequence decode step."""
    try:
        from transformers.tokenization_utils_base import PreTrainedTokenizerBase
        from transformers.tokenization_utils_tokenizers import TokenizersBackend
    except ImportError:  # another transformers layout: keep its decode
        return None
    cls = type(tokenizer)
    if (not isinstance(tokenizer, TokenizersBackend) or cls._decode is not TokenizersBackend._decode
            or cls.decode is not PreTrainedTokenizerBase.decode):
        return None
    return getattr(getattr(tokenizer, "_tokenizer", None), "decode", None)


class IncrementalDetokenizer:
    def __init__(self, tokenizer: Any, prompt_token_ids: Seq[int], stop: Seq[str] = (),
                 skip_special_tokens: bool = True):
        self.tokenizer = tokenizer
        self._backend_decode = backend_decode(tokenizer)
        self.skip_special_tokens = skip_special_tokens
        self.stop = tuple(stop)
        self._max_stop_len = max((len(s) for s in self.stop), default=0)
        self._ids: list[int] = list(prompt_token_ids)
        self._read_offset = len(self._ids)  # ids before this are reflected in `text`
        self._prefix_offset = max(self._read_offset - _PREFIX_CONTEXT_TOKENS, 0)
        self.text = ""  # all generated text so far (cut at a stop string once one is found)
        self._emitted = 0  # len of text already handed out
        self.stopped = False

    def _decode(self, ids: Seq[int]) -> str:
        if self._backend_decode is not None:
            return self._backend_decode(list(ids), skip_special_tokens=self.skip_special_tokens)
        return self.tokenizer.decode(list(ids), skip_special_tokens=self.skip_special_tokens,
                                     clean_up_tokenization_spaces=False)

    def add_token(self, token_id: int) -> str:
        """Take one generated token; return the text that may be emitted now (maybe "")."""
        if self.stopped:
            return ""
        self._ids.append(token_id)
        prefix = self._decode(self._ids[self._prefix_offset:self._read_offset])
        full = self._decode(self._ids[self._prefix_offset:])
        if len(full) > len(prefix) and not full.endswith("\ufffd"):
            new_text = full[len(prefix):]
            self._prefix_offset, self._read_offset = self._read_offset, len(self._ids)
            before = len(self.text)
            self.text += new_text
            if self._find_stop(before):
                return self._release(len(self.text))
        return self._release(len(self.text) - self._held_back())

    def flush(self) -> str:
        """The sequence finished for another reason: no stop string can complete any more, so
        release the text held back as a possible stop-string prefix, and bytes of an unfinished
        character as U+FFFD (what a full decode shows), so that the concatenated deltas always
        equal tokenizer.decode(generated ids) up to any stop string."""
        if not self.stopped and self._read_offset < len(self._ids):
            prefix = self._decode(self._ids[self._prefix_offset:self._read_offset])
            full = self._decode(self._ids[self._prefix_offset:])
            self.text += full[len(prefix):]
            self._prefix_offset = self._read_offset = len(self._ids)
        return self._release(len(self.text))

    def _find_stop(self, before: int) -> bool:
        """Search for a stop string ending in the text added after `before`; cut text there."""
        if not self.stop:
            return False
        start = max(before - self._max_stop_len + 1, 0)
        hits = [i for i in (self.text.find(s, start) for s in self.stop) if i >= 0]
        if not hits:
            return False
        self.text = self.text[:min(hits)]
        self.stopped = True
        return True

    def _held_back(self) -> int:
        """Length of the longest suffix of text that is a proper prefix of some stop string."""
        best = 0
        for s in self.stop:
            for n in range(min(len(s) - 1, len(self.text)), best, -1):
                if self.text.endswith(s[:n]):
                    best = n
                    break
        return best

    def _release(self, upto: int) -> str:
        upto = max(upto, self._emitted)
        out = self.text[self._emitted:upto]
        self._emitted = upto
        return out


def check_finish(token_id: int, num_generated: int, num_tokens: int, params: SamplingParams,
                 eos_token_ids: frozenset[int], max_model_len: int,
                 stopped_by_string: bool) -> FinishReason | None:
    """Why a sequence stops after sampling `token_id` (None: it goes on). EOS beats a stop string
    beats length, so the reason names what the model actually did."""
    if not params.ignore_eos and token_id in eos_token_ids:
        return FinishReason.EOS
    if stopped_by_string:
        return FinishReason.STOP
    if num_generated >= params.max_new_tokens or num_tokens >= max_model_len:
        return FinishReason.LENGTH
    return None
