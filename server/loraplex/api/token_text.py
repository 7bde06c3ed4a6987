"""The text and the exact bytes of a single token, for logprobs responses.

Decoding one token alone is not the same as decoding the text: a byte-level BPE token may hold
part of a UTF-8 character, and tokenizers strip or add spaces around lone tokens. So the bytes are
read from the token's vocabulary string:

  - byte-level BPE (GPT-2, Llama 3, SmolLM, Qwen): each character of the vocabulary string stands
    for one byte through the fixed byte <-> printable-character table of byte-level BPE, which is
    inverted here;
  - SentencePiece with byte fallback (Llama 2, Mistral): "<0x0A>" is the byte 0x0A and "▁" a space;
  - anything else (special tokens, unknown schemes): the UTF-8 of the tokenizer's own decoding.

The text is those bytes decoded as UTF-8, an incomplete character replaced by U+FFFD (OpenAI
returns `bytes` exactly so that clients can reassemble such characters).
"""

from __future__ import annotations

import re
from functools import lru_cache
from typing import Any

_BYTE_TOKEN = re.compile(r"<0x([0-9A-Fa-f]{2})>")
_SPIECE_SPACE = "\u2581"  # ▁


def _byte_level_table() -> dict[str, int]:
    """Byte-level BPE's printable character -> byte. Printable Latin-1 bytes stand for themselves;
    the other 68 bytes (controls, space, 127-160, 173) take the characters 256, 257, ... in order."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    table = {chr(b): b for b in printable}
    extra = 0
    for b in range(256):
        if b not in printable:
            table[chr(256 + extra)] = b
            extra += 1
    return table


_BYTE_LEVEL = _byte_level_table()


def _is_byte_level(tokenizer: Any) -> bool:
    backend = getattr(tokenizer, "backend_tokenizer", None)
    decoder = getattr(backend, "decoder", None)
    return decoder is not None and "ByteLevel" in repr(decoder)


class TokenText:
    """token id -> (text, bytes) for one tokenizer; cached, since the same ids recur."""

    def __init__(self, tokenizer: Any):
        self._tokenizer = tokenizer
        self._byte_level = _is_byte_level(tokenizer)
        self._special = set(getattr(tokenizer, "all_special_ids", ()) or ())
        self.bytes = lru_cache(maxsize=65536)(self._bytes)

    def text(self, token_id: int) -> str:
        return self.bytes(token_id).decode("utf-8", errors="replace")

    def _bytes(self, token_id: int) -> bytes:
        tok = self._tokenizer
        piece = tok.convert_ids_to_tokens(token_id)
        if isinstance(piece, str) and token_id not in self._special:
            m = _BYTE_TOKEN.fullmatch(piece)
            if m:
                return bytes([int(m.group(1), 16)])
            if self._byte_level and all(c in _BYTE_LEVEL for c in piece):
                return bytes(_BYTE_LEVEL[c] for c in piece)
            if not self._byte_level and _SPIECE_SPACE in piece:
                return piece.replace(_SPIECE_SPACE, " ").encode("utf-8")
        return tok.decode([token_id]).encode("utf-8")
