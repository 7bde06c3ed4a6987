"""Engine TokenLogprobs -> OpenAI's two logprobs objects.

    completions   {"tokens": [str], "token_logprobs": [float], "top_logprobs": [{str: float}],
                   "text_offset": [int]}: top_logprobs holds the k most likely tokens and the
                   sampled one (so up to k + 1 entries, as OpenAI documents); text_offset is each
                   token's position in the choice's text (the echoed prompt included).
    chat          {"content": [{"token", "logprob", "bytes", "top_logprobs": [{"token", "logprob",
                   "bytes"}]}], "refusal": null}

Streaming sends the same objects for the tokens of each chunk; the completions text_offset carries
on from the previous chunk (the caller passes `offset`).
"""

from __future__ import annotations

from collections.abc import Sequence as Seq
from typing import Any

from loraplex.engine.logprobs import TokenLogprob


def completion_logprobs(logprobs: Seq[TokenLogprob], token_text: Any, offset: int = 0) -> dict:
    """token_text: api/token_text.TokenText; offset: characters of text before the first token."""
    tokens, values, tops, offsets = [], [], [], []
    for lp in logprobs:
        text = token_text.text(lp.token_id)
        tokens.append(text)
        values.append(lp.logprob)
        top = {token_text.text(t): v for t, v in lp.top}
        top.setdefault(text, lp.logprob)
        tops.append(top)
        offsets.append(offset)
        offset += len(text)
    return {"tokens": tokens, "token_logprobs": values, "top_logprobs": tops, "text_offset": offsets}


def completion_text_length(logprobs: dict) -> int:
    """Where the next chunk's text_offset starts: just past this chunk's last token."""
    if not logprobs["tokens"]:
        return 0
    return logprobs["text_offset"][-1] + len(logprobs["tokens"][-1])


def chat_logprobs(logprobs: Seq[TokenLogprob], token_text: Any) -> dict:
    def entry(token_id: int, logprob: float) -> dict:
        raw = token_text.bytes(token_id)
        return {"token": raw.decode("utf-8", errors="replace"), "logprob": logprob, "bytes": list(raw)}

    return {"content": [{**entry(lp.token_id, lp.logprob), "top_logprobs": [entry(t, v) for t, v in lp.top]}
                        for lp in logprobs],
            "refusal": None}
