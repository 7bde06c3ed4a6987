"""Incremental detokenization, stop strings across token boundaries, unicode, finish reasons."""

from __future__ import annotations

import pytest

from loraplex.engine.detokenizer import IncrementalDetokenizer, check_finish
from loraplex.engine.request import FinishReason, SamplingParams
from tests.fixtures.tiny_models import train_tiny_tokenizer


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    return train_tiny_tokenizer(tmp_path_factory.mktemp("detok_tokenizer"))


def stream(tok, text: str, stop=(), prompt: str = "Hello there."):
    """Feed the tokens of `text` one by one; return (deltas, detokenizer, ids)."""
    prompt_ids = tok.encode(prompt)
    ids = tok.encode(text)
    d = IncrementalDetokenizer(tok, prompt_ids, stop=stop)
    deltas = []
    for t in ids:
        deltas.append(d.add_token(t))
        if d.stopped:
            break
    return deltas, d, ids


@pytest.mark.parametrize("text", [
    " The quick brown fox jumps over the lazy dog.",
    "Ünïcödé: héllo wörld, 世界 你好, emoji 🙂🚀 and ñ!",
    "  leading spaces,\nnew lines\tand tabs  ",
])
def test_stream_equals_full_decode_and_never_splits_a_character(tok, text):
    deltas, d, ids = stream(tok, text)
    assert "".join(deltas) + d.flush() == tok.decode(ids) == text
    assert all("\ufffd" not in x for x in deltas)


def test_multibyte_characters_really_span_tokens(tok):
    ids = tok.encode("🙂")
    assert len(ids) > 1  # byte-level BPE: 4 bytes, unseen in training -> several tokens
    deltas, d, _ = stream(tok, "🙂")
    assert deltas[:-1] == [""] * (len(ids) - 1) and deltas[-1] == "🙂"


def test_stop_string_spanning_tokens_cuts_before_it(tok):
    text = " The quick brown fox jumps over the lazy dog."
    ids = tok.encode(text)
    pieces = [tok.decode([i]) for i in ids]
    assert not any("fox jum" in p for p in pieces)  # the stop string spans several tokens
    deltas, d, _ = stream(tok, text, stop=("fox jum",))
    assert d.stopped and d.text == " The quick brown "
    assert "".join(deltas) == " The quick brown "
    assert d.flush() == ""
    # Never emitted anything that could be the start of the stop string before it was resolved.
    assert all("f" not in x for x in deltas)


def test_earliest_stop_string_wins(tok):
    deltas, d, _ = stream(tok, " one two three four", stop=("four", "two", "three"))
    assert d.stopped and "".join(deltas) == " one "


def test_held_back_prefix_is_released_when_the_stop_does_not_complete(tok):
    text = " the lazy dog. the lazy do"
    deltas, d, ids = stream(tok, text, stop=("lazy dogs",))
    assert not d.stopped
    emitted = "".join(deltas)
    # "lazy dog" was held until "." ruled the stop out; the final "lazy do" could still become it.
    assert emitted == " the lazy dog. the "
    assert d.flush() == "lazy do"


def test_stop_string_inside_one_token_and_unicode_stop(tok):
    deltas, d, _ = stream(tok, " The capital of France is Paris.", stop=("France",))
    assert "".join(deltas) == " The capital of " and d.stopped
    deltas, d, _ = stream(tok, " ab 世界 cd", stop=("界",))
    assert "".join(deltas) == " ab 世" and d.stopped


def test_flush_releases_an_unfinished_character(tok):
    ids = tok.encode(" ab 🙂")
    d = IncrementalDetokenizer(tok, tok.encode("x"))
    deltas = [d.add_token(t) for t in ids[:-1]]  # the emoji's last byte never arrives
    assert "".join(deltas) == " ab "
    assert d.flush() == tok.decode(ids[:-1])[len(" ab "):] and d.flush() == ""
    assert d.text == tok.decode(ids[:-1]) and d.text.endswith("\ufffd")


def test_leading_space_of_first_token_uses_prompt_context(tok):
    deltas, d, ids = stream(tok, " world", prompt="Hello")
    assert "".join(deltas) + d.flush() == " world"


def test_check_finish_priorities():
    p = SamplingParams(max_new_tokens=3)
    eos = frozenset({0, 2})
    f = lambda tok, gen, n, params=p, stopped=False, mml=100: check_finish(  # noqa: E731
        tok, gen, n, params, eos, mml, stopped)
    assert f(5, 1, 10) is None
    assert f(2, 1, 10) is FinishReason.EOS
    assert f(2, 3, 10, stopped=True) is FinishReason.EOS
    assert f(5, 1, 10, stopped=True) is FinishReason.STOP
    assert f(5, 3, 10) is FinishReason.LENGTH
    assert f(5, 1, 100) is FinishReason.LENGTH  # reached max_model_len
    assert f(0, 1, 10, params=SamplingParams(max_new_tokens=3, ignore_eos=True)) is None


def test_backend_decode_is_transformers_decode(tok):
    """The detokenizer decodes through the tokenizer's own Rust decode where transformers' decode
    is exactly that call: the same text on random id windows (added/special tokens included, with
    and without skip_special_tokens); a tokenizer overriding decode keeps transformers' path."""
    import random

    from loraplex.engine.detokenizer import backend_decode

    fast = backend_decode(tok)
    assert fast is not None and IncrementalDetokenizer(tok, [1])._backend_decode is not None
    rng = random.Random(3)
    size = len(tok)
    for _ in range(2000):
        ids = [rng.randrange(size) for _ in range(rng.randrange(1, 10))]
        for skip in (True, False):
            assert fast(ids, skip_special_tokens=skip) == tok.decode(
                ids, skip_special_tokens=skip, clean_up_tokenization_spaces=False)

    class Custom(type(tok)):
        def decode(self, *args, **kwargs):
            return "custom"

    custom = Custom.__new__(Custom)
    custom.__dict__.update(tok.__dict__)
    assert backend_decode(custom) is None
    assert backend_decode(object()) is None
