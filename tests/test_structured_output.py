"""Structured output in the engine: JSON schemas, regexes and choices on the tiny random Llama,
greedy and sampled, base model and two LoRA adapters, all in one batch.

A random model produces garbage, which is what makes these tests meaningful: left alone it never
writes JSON, so every valid output is the constraint's doing. Validity is judged independently:
`jsonschema` for schemas, `re.fullmatch` for regexes, membership for choices.
"""

from __future__ import annotations

import json
import re

import jsonschema
import pytest
import torch

from loraplex.config import EngineConfig, LoraConfig
from loraplex.engine.engine import Engine
from loraplex.engine.request import FinishReason, InvalidRequestError, Request, SamplingParams
from loraplex.engine.structured.compiler import GrammarCompiler
from loraplex.engine.structured.grammar import GrammarVocab
from loraplex.engine.structured.masks import MaskBuilder, TokenMasks, unpack_bitmask
from loraplex.engine.structured.spec import Constraint, Kind
from loraplex.model.loader import load_model
from tests.fixtures.adapters import make_peft_adapter
from tests.fixtures.engine_run import run_requests as run
from tests.fixtures.json_schemas import CHOICES, REGEXES, SCHEMAS

pytestmark = pytest.mark.timeout(300)

MAX_TOKENS = 160  # every test schema completes well within this (bounded strings, arrays, numbers)
ADAPTERS = ("qv", "all")


@pytest.fixture(scope="module")
def loaded(tiny_model_dir):
    return load_model(tiny_model_dir, torch.float32, "cpu")


@pytest.fixture(scope="module")
def manager(loaded, tiny_model_dir, tmp_path_factory):
    from loraplex.lora.manager import LoraManager

    root = tmp_path_factory.mktemp("so_adapters")
    make_peft_adapter(tiny_model_dir, root / "qv", "qv_r4", seed=3)
    make_peft_adapter(tiny_model_dir, root / "all", "all_r8_rslora", seed=4)
    m = LoraManager(LoraConfig(max_loras=4, max_lora_rank=16, allowed_roots=(str(root),)),
                    loaded.model, loaded.dtype, "cpu")
    for name in ADAPTERS:
        m.load(name, root / name)
    return m


def make_engine(loaded, manager=None, **kw):
    cfg = dict(block_size=16, num_kv_blocks=400, max_num_seqs=96, max_num_batched_tokens=512,
               max_model_len=256, max_new_tokens_cap=MAX_TOKENS)
    cfg.update(kw)
    engine = Engine(loaded, EngineConfig(**cfg), lora_manager=manager)
    engine.start()
    return engine


def constraint_jobs() -> dict[str, tuple[Constraint, object]]:
    """key -> (constraint, checker). Checker(text) raises / returns False when invalid."""
    out = {}
    for name, schema in SCHEMAS.items():
        out[f"json:{name}"] = (Constraint.json_schema(schema, "s"),
                               lambda t, s=schema: jsonschema.validate(json.loads(t), s) is None)
    for name, rx in REGEXES.items():
        out[f"regex:{name}"] = (Constraint(Kind.REGEX, rx, field="r"),
                                lambda t, rx=rx: re.fullmatch(rx, t) is not None)
    for name, ch in CHOICES.items():
        out[f"choice:{name}"] = (Constraint(Kind.CHOICE, choices=tuple(ch), field="c"),
                                 lambda t, ch=ch: t in ch)
    return out


def prompt(i: int) -> list[int]:
    return [1 + (7 * i) % 300, 2 + (13 * i) % 300, 3 + (5 * i) % 300]


def test_schema_set_is_large_and_varied():
    assert len(SCHEMAS) >= 20
    text = json.dumps(SCHEMAS)
    for keyword in ('"enum"', '"pattern"', '"minimum"', '"maximum"', '"items"', '"anyOf"', '"const"'):
        assert keyword in text, keyword
    assert any(set(s.get("properties", {})) - set(s.get("required", [])) for s in SCHEMAS.values())  # optional fields


def test_every_constraint_greedy_and_sampled_with_adapters_in_one_batch(loaded, manager):
    """~60 constrained requests (every schema, regex and choice; greedy and seeded sampling; base
    model and two adapters) plus free-text rows, submitted together: 100% valid, each ended by its
    grammar (or EOS in an accepting state), none cut by max_tokens."""
    engine = make_engine(loaded, manager)
    try:
        jobs, checks = {}, {}
        for i, (key, (constraint, check)) in enumerate(constraint_jobs().items()):
            for mode in ("greedy", "sampled"):
                k = f"{key}:{mode}"
                params = (SamplingParams(max_new_tokens=MAX_TOKENS, temperature=0.0) if mode == "greedy" else
                          SamplingParams(max_new_tokens=MAX_TOKENS, temperature=1.0, top_p=0.95, seed=1000 + i))
                adapter = ("",) + ADAPTERS
                jobs[k] = Request(f"r-{k}", prompt(i), params,
                                  adapter_id=adapter[(i + (mode == "sampled")) % 3], constraint=constraint)
                checks[k] = check
        for j in range(4):
            jobs[f"free:{j}"] = Request(f"free{j}", prompt(100 + j),
                                        SamplingParams(max_new_tokens=20, temperature=0.0, ignore_eos=True),
                                        adapter_id=(("",) + ADAPTERS + ("",))[j])
        results = run(engine, jobs)
    finally:
        engine.shutdown(1)
    assert {jobs[k].adapter_id for k in checks} == {"", *ADAPTERS}
    bad = []
    for k, check in checks.items():
        text, toks, reason, error = results[k]
        ok = False
        try:
            ok = bool(check(text))
        except Exception as exc:  # noqa: BLE001 - reported below with the text
            ok = f"{type(exc).__name__}: {exc}"[:120]
        if ok is not True or reason not in (FinishReason.GRAMMAR, FinishReason.EOS) or error:
            bad.append((k, reason, ok, text[:80]))
    assert not bad, f"{len(bad)} of {len(checks)} invalid: {bad}"
    grammar_ended = sum(results[k][2] is FinishReason.GRAMMAR for k in checks)
    assert grammar_ended >= len(checks) // 2  # objects/arrays/choices end by their grammar
    for j in range(4):  # free text ran next to them, untouched by their masks
        assert results[f"free:{j}"][2] is FinishReason.LENGTH and len(results[f"free:{j}"][1]) == 20


def test_unconstrained_rows_unchanged_by_constrained_neighbours(loaded, manager):
    free = {f"f{j}": (prompt(200 + j), (("",) + ADAPTERS)[j % 3]) for j in range(5)}

    def free_reqs(tag):
        return {k: Request(f"{tag}-{k}", p, SamplingParams(max_new_tokens=24, temperature=0.0, ignore_eos=True),
                           adapter_id=a) for k, (p, a) in free.items()}

    engine = make_engine(loaded, manager)
    try:
        alone = run(engine, free_reqs("alone"))
        jobs = free_reqs("mixed")
        for i, (key, (c, _)) in enumerate(list(constraint_jobs().items())[:12]):
            jobs[key] = Request(f"mixed-{key}", prompt(i), SamplingParams(max_new_tokens=MAX_TOKENS, temperature=0.0),
                                adapter_id=(("",) + ADAPTERS)[i % 3], constraint=c)
        mixed = run(engine, jobs)
    finally:
        engine.shutdown(1)
    for k in free:
        assert mixed[k][1] == alone[k][1], k
    # and the constrained rows really were constrained (not free text)
    assert all(mixed[k][2] in (FinishReason.GRAMMAR, FinishReason.EOS) for k in jobs if k not in free)


def test_max_tokens_cutting_the_structure_is_length(loaded):
    engine = make_engine(loaded)
    try:
        c = Constraint.json_schema(SCHEMAS["extraction"], "s")
        res = run(engine, {"cut": Request("cut", prompt(1), SamplingParams(max_new_tokens=4, temperature=0.0),
                                          constraint=c)})
    finally:
        engine.shutdown(1)
    text, toks, reason, _ = res["cut"]
    assert reason is FinishReason.LENGTH and len(toks) == 4
    assert '{"invoice":"INV'.startswith(text)  # a prefix of the structure ...
    with pytest.raises(ValueError):
        json.loads(text)  # ... that is not complete


def test_preempted_and_recomputed_sequences_do_not_double_advance(loaded):
    """A KV cache too small for all sequences preempts (recompute) some; their outputs must be the
    same greedy outputs as in a roomy run, token for token (a matcher that re-consumed the replayed
    tokens would go into its error state or drift)."""
    keys = ["json:tool_call", "json:extraction", "json:nested_object", "json:array_of_objects",
            "regex:ipv4ish", "json:deep_nesting"]
    allc = constraint_jobs()

    def jobs(tag):
        return {k: Request(f"{tag}-{k}", prompt(i) * 10, SamplingParams(max_new_tokens=MAX_TOKENS, temperature=0.0),
                           constraint=allc[k][0]) for i, k in enumerate(keys)}

    roomy = make_engine(loaded)
    try:
        ref = run(roomy, jobs("roomy"))
    finally:
        roomy.shutdown(1)
    tight = make_engine(loaded, num_kv_blocks=12, max_model_len=192, block_size=16)
    try:
        got = run(tight, jobs("tight"))
        preemptions = tight.stats().preemptions_total
    finally:
        tight.shutdown(1)
    assert preemptions > 0, "the test needs preemption to mean anything"
    for k in keys:
        assert got[k][1] == ref[k][1], k
        assert got[k][2] is ref[k][2] and got[k][3] is None
        assert allc[k][1](got[k][0])


def test_overlap_off_gives_the_same_tokens(loaded):
    items = list(constraint_jobs().items())[:10]

    def jobs(tag):
        return {k: Request(f"{tag}-{k}", prompt(i), SamplingParams(max_new_tokens=MAX_TOKENS, temperature=0.8, seed=i),
                           constraint=c) for i, (k, (c, _)) in enumerate(items)}

    outs = []
    for overlap in (True, False):
        engine = make_engine(loaded, structured_output_overlap=overlap)
        try:
            outs.append(run(engine, jobs(str(overlap))))
        finally:
            engine.shutdown(1)
    for k, _ in items:
        assert outs[0][k][1] == outs[1][k][1], k


# --- masks against a plain reference ----------------------------------------------------------------
def test_token_masks_apply_matches_a_plain_bit_reference():
    g = torch.Generator().manual_seed(0)
    vocab, rows = 100, [0, 2, 3]
    words = (vocab + 31) // 32
    bitmask = torch.randint(-2**31, 2**31 - 1, (len(rows), words), generator=g, dtype=torch.int64).to(torch.int32)
    logits = torch.randn(5, vocab, generator=g, dtype=torch.float32)
    masks = TokenMasks(torch.tensor(rows), unpack_bitmask(bitmask, vocab))
    out = masks.apply(logits)
    ref = logits.clone()
    for j, r in enumerate(rows):
        for t in range(vocab):
            word = int(bitmask[j, t // 32]) & 0xFFFFFFFF
            if not (word >> (t % 32)) & 1:
                ref[r, t] = float("-inf")
    assert torch.equal(out, ref)
    assert not torch.equal(out, logits)  # the random bits did disallow some tokens
    assert torch.equal(logits[[1, 4]], out[[1, 4]])  # unconstrained rows untouched


def test_mask_builder_marks_exactly_the_grammar_allowed_tokens(loaded):
    """The mask of a choice grammar at its start allows exactly the tokens that begin a choice."""
    vocab = GrammarVocab.from_hf(loaded.tokenizer, loaded.arch.vocab_size, [loaded.tokenizer.eos_token_id])
    from loraplex.engine.structured.grammar import compile_constraint

    choices = ("alpha", "beta")
    g = compile_constraint(vocab, Constraint(Kind.CHOICE, choices=choices, field="c"))
    builder = MaskBuilder(loaded.arch.vocab_size, overlap=True)
    try:
        masks = builder.start([None, g.matcher()]).result()
    finally:
        builder.shutdown()
    allowed = set(torch.nonzero(masks.allowed[0]).flatten().tolist())
    tok = loaded.tokenizer
    expected = {t for t in range(len(tok)) if (s := tok.decode([t])) and any(c.startswith(s) for c in choices)
                and t not in tok.all_special_ids}
    assert masks.rows.tolist() == [1]
    assert allowed == expected


# --- compiler: cache bound, bad input, timeouts ------------------------------------------------------
@pytest.fixture(scope="module")
def vocab(loaded):
    return GrammarVocab.from_hf(loaded.tokenizer, loaded.arch.vocab_size, [loaded.tokenizer.eos_token_id])


def test_compile_cache_is_bounded_lru_and_shared(vocab):
    comp = GrammarCompiler(lambda: vocab, timeout_s=30, max_bytes=10_000, cache_size=3)
    try:
        cs = [Constraint(Kind.REGEX, f"[a-z]{{{i}}}", field="r") for i in range(1, 6)]
        first = comp.compile(cs[0])
        assert comp.compile(Constraint(Kind.REGEX, "[a-z]{1}", field="other")) is first  # key ignores the field
        assert (comp.hits, comp.misses) == (1, 1)
        for c in cs[1:]:
            comp.compile(c)
        assert comp.cache_len == 3
        assert comp.compile(cs[0]) is not first  # evicted (least recently used), compiled again
        assert comp.misses == 6
    finally:
        comp.shutdown()


@pytest.mark.parametrize("constraint, reason", [
    (lambda: Constraint.json_schema({"type": "object", "properties": {"a": {"type": "frob"}}}, "f"), "frob"),
    (lambda: Constraint.json_schema({"type": "array", "uniqueItems": True}, "f"), "uniqueItems"),
    (lambda: Constraint(Kind.JSON_SCHEMA, "{not json", field="f"), "not valid JSON"),
    (lambda: Constraint(Kind.JSON_SCHEMA, "[1, 2]", field="f"), "object"),
    (lambda: Constraint(Kind.REGEX, "a(b", field="f"), "regular expression"),
    (lambda: Constraint(Kind.CHOICE, choices=(), field="f"), "at least one"),
    (lambda: Constraint(Kind.GRAMMAR, "start: undefined_rule", field="f"), "undefined_rule"),
    (lambda: Constraint(Kind.REGEX, "a" * 2000, field="f"), "at most 1000"),
])
def test_bad_constraints_are_refused_naming_the_field(vocab, constraint, reason):
    comp = GrammarCompiler(lambda: vocab, timeout_s=30, max_bytes=1000, cache_size=8)
    try:
        with pytest.raises(InvalidRequestError) as exc:
            comp.compile(constraint())
        assert exc.value.field == "f" and reason in str(exc.value), str(exc.value)
        assert comp.cache_len == 0  # failures are not cached
    finally:
        comp.shutdown()


def test_slow_compile_is_refused_within_the_timeout(vocab):
    import time

    # A schema that takes llguidance a while (many alternatives); the timeout is far shorter.
    schema = {"type": "object", "properties": {f"k{i}": {"type": "string", "pattern": f"^[a-z]{{{i % 7 + 1}}}[0-9]+x{i}$"}
                                               for i in range(400)}, "required": [f"k{i}" for i in range(400)]}
    comp = GrammarCompiler(lambda: vocab, timeout_s=0.001, max_bytes=1_000_000, cache_size=8)
    try:
        t0 = time.monotonic()
        with pytest.raises(InvalidRequestError) as exc:
            comp.compile(Constraint.json_schema(schema, "response_format"))
        assert time.monotonic() - t0 < 1.0
        assert exc.value.field == "response_format" and "compile-timeout" in str(exc.value)
    finally:
        comp.shutdown()


def test_bad_constraint_on_submit_leaves_the_engine_serving(loaded):
    engine = make_engine(loaded)
    try:
        with pytest.raises(InvalidRequestError):
            engine.submit(Request("bad", prompt(1), SamplingParams(max_new_tokens=8),
                                  constraint=Constraint(Kind.REGEX, "(", field="guided_regex")), lambda out: None)
        res = run(engine, {"ok": Request("ok", prompt(2), SamplingParams(max_new_tokens=40, temperature=0.0),
                                         constraint=Constraint(Kind.CHOICE, choices=("yes", "no"), field="c"))})
        assert res["ok"][0] in ("yes", "no") and res["ok"][2] is FinishReason.GRAMMAR
        assert engine.stats().num_running == 0
    finally:
        engine.shutdown(1)


def test_all_rows_constrained_path_matches_the_subset_path():
    g = torch.Generator().manual_seed(1)
    vocab = 70
    bitmask = torch.randint(-2**31, 2**31 - 1, (3, 3), generator=g, dtype=torch.int64).to(torch.int32)
    logits = torch.randn(3, vocab, generator=g)
    allowed = unpack_bitmask(bitmask, vocab)
    full = TokenMasks(torch.tensor([0, 1, 2]), allowed).apply(logits)
    assert torch.equal(full, torch.where(allowed, logits, torch.tensor(float("-inf"))))
    padded = torch.cat([logits, logits[:1]])  # a 4th, unconstrained row forces the subset path
    assert torch.equal(TokenMasks(torch.tensor([0, 1, 2]), allowed).apply(padded)[:3], full)
