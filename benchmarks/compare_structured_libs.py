"""Which constrained-decoding library: llguidance vs xgrammar vs outlines-core, measured on the
default model's tokenizer (SmolLM2-135M-Instruct, 49,152 tokens) over the test schemas
(tests/fixtures/json_schemas.py).

Per library:
  tokenizer setup   one-time cost of wrapping the HF tokenizer (paid once at server start)
  compile           schema -> grammar -> matcher -> first mask, nothing cached (what the first
                    request with a new schema waits for); p50 / p99 / max over the schemas
  mask at 32 rows   one [32, vocab] bitmask per step for 32 matchers (the schemas cycled over the
                    rows), each advanced by a random walk over its allowed tokens; median over
                    steps. Sequential = one call per row in a Python loop; batched = the library's
                    own batch API where it has one (llguidance's LLExecutor, xgrammar's
                    BatchGrammarMatcher), which fans out over native threads.

Only llguidance is a dependency of loraplex; install the others next to it to rerun, e.g.
    pip install --target /tmp/so_libs --no-deps xgrammar==0.2.8 apache-tvm-ffi==0.1.15.post2 \
        outlines-core==0.2.14 llguidance==1.9.1
    PYTHONPATH=/tmp/so_libs:server python benchmarks/compare_structured_libs.py --steps 40
A library that cannot be imported is reported as such.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from tests.fixtures.json_schemas import SCHEMAS  # noqa: E402


def _pct(xs, q):
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(q * (len(xs) - 1))))]


def _allowed(bitmask_row: np.ndarray, vocab: int) -> np.ndarray:
    bits = np.unpackbits(bitmask_row.view(np.uint8), bitorder="little")[:vocab]
    return np.flatnonzero(bits)


class LLGuidance:
    name = "llguidance"

    def __init__(self, hf_tok, vocab):
        import llguidance
        import llguidance.hf
        import llguidance.torch as lt
        self.ll, self.lt, self.vocab = llguidance, lt, vocab
        self.tok = llguidance.hf.from_tokenizer(hf_tok, n_vocab=vocab)
        self.executor = llguidance.LLExecutor()

    def compile(self, schema):
        g = self.ll.LLMatcher.grammar_from_json_schema(json.dumps(schema),
                                                       defaults={"whitespace_flexible": False})
        m = self.ll.LLMatcher(self.tok, g)
        assert not m.is_error(), m.get_error()
        return m

    def fill_seq(self, matchers, bitmask):
        for i, m in enumerate(matchers):
            self.lt.fill_next_token_bitmask(m, bitmask, i)

    def fill_batch(self, matchers, bitmask):
        self.lt.fill_next_token_bitmask_par(self.executor, [(m, i) for i, m in enumerate(matchers)], bitmask)

    def advance(self, m, token):
        assert m.consume_token(token), m.get_error()

    def done(self, m):
        return m.is_stopped()


class XGrammar:
    name = "xgrammar"

    def __init__(self, hf_tok, vocab):
        import xgrammar as xgr
        self.xgr, self.vocab = xgr, vocab
        info = xgr.TokenizerInfo.from_huggingface(hf_tok, vocab_size=vocab)
        self.compiler = xgr.GrammarCompiler(info, cache_enabled=False)
        self.batch = xgr.BatchGrammarMatcher() if hasattr(xgr, "BatchGrammarMatcher") else None

    def compile(self, schema):
        cg = self.compiler.compile_json_schema(json.dumps(schema), any_whitespace=False)
        return self.xgr.GrammarMatcher(cg)

    def fill_seq(self, matchers, bitmask):
        for i, m in enumerate(matchers):
            m.fill_next_token_bitmask(bitmask, i)

    def fill_batch(self, matchers, bitmask):
        self.batch.batch_fill_next_token_bitmask(matchers, bitmask)

    def advance(self, m, token):
        assert m.accept_token(token)

    def done(self, m):
        return m.is_terminated()


class OutlinesCore:
    name = "outlines-core"

    def __init__(self, hf_tok, vocab):
        import outlines_core as oc
        from outlines_core.json_schema import build_regex_from_schema
        self.oc, self.build_regex, self.vocab = oc, build_regex_from_schema, vocab
        # Byte-level BPE: map each token's printable form back to its bytes (GPT-2's table).
        bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + \
            list(range(ord("®"), ord("ÿ") + 1))
        cs, n = bs[:], 0
        for b in range(256):
            if b not in bs:
                bs.append(b)
                cs.append(256 + n)
                n += 1
        dec = {chr(c): b for b, c in zip(bs, cs)}
        eos = hf_tok.eos_token_id
        special = set(hf_tok.all_special_ids)
        table: dict[bytes, list[int]] = {}
        for tok, i in hf_tok.get_vocab().items():
            if i == eos or i in special:
                continue
            try:
                key = bytes(dec[c] for c in tok)
            except KeyError:
                continue
            table.setdefault(key, []).append(i)
        self.vocabulary = oc.Vocabulary(eos, table)

    def compile(self, schema):
        regex = self.build_regex(json.dumps(schema))
        return self.oc.Guide(self.oc.Index(regex, self.vocabulary))

    def fill_seq(self, matchers, bitmask):
        for i, g in enumerate(matchers):
            row = bitmask[i]
            g.write_mask_into(row.data_ptr(), row.numel(), 4)

    fill_batch = None

    def advance(self, g, token):
        g.advance(token)

    def done(self, g):
        return g.is_finished()


def measure(lib_cls, hf_tok, vocab, steps, rows, seed):
    t0 = time.perf_counter()
    lib = lib_cls(hf_tok, vocab)
    setup = time.perf_counter() - t0
    names = list(SCHEMAS)
    words = (vocab + 31) // 32
    compile_s = []
    for name in names:
        t0 = time.perf_counter()
        m = lib.compile(SCHEMAS[name])
        bm = torch.zeros(1, words, dtype=torch.int32)
        lib.fill_seq([m], bm)
        compile_s.append(time.perf_counter() - t0)
    rng = random.Random(seed)
    result = {"lib": lib.name, "setup": setup, "compile": compile_s}
    for mode in ("seq", "batch"):
        fill = lib.fill_seq if mode == "seq" else getattr(lib, "fill_batch", None)
        if fill is None or (mode == "batch" and lib.name == "xgrammar" and lib.batch is None):
            continue
        matchers = [lib.compile(SCHEMAS[names[i % len(names)]]) for i in range(rows)]
        bitmask = torch.zeros(rows, words, dtype=torch.int32)
        times = []
        for _ in range(steps):
            t0 = time.perf_counter()
            fill(matchers, bitmask)
            times.append(time.perf_counter() - t0)
            arr = bitmask.numpy()
            for i, m in enumerate(matchers):
                ok = _allowed(arr[i], vocab)
                if len(ok):
                    lib.advance(m, int(rng.choice(list(ok))))
                if not len(ok) or lib.done(m):  # restart finished rows so all 32 stay live
                    matchers[i] = lib.compile(SCHEMAS[names[i % len(names)]])
        result[mode] = statistics.median(times)
    return result


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model-dir", default=None, help="default: the converted default model")
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--rows", type=int, default=32)
    ap.add_argument("--json", default=None, help="write the raw numbers here")
    args = ap.parse_args(argv)
    from transformers import AutoTokenizer

    from loraplex.model.default_model import ensure_default_model
    model_dir = args.model_dir or ensure_default_model(progress=False)
    hf_tok = AutoTokenizer.from_pretrained(model_dir)
    vocab = json.loads((Path(model_dir) / "config.json").read_text())["vocab_size"]
    out = []
    for cls in (LLGuidance, XGrammar, OutlinesCore):
        try:
            r = measure(cls, hf_tok, vocab, args.steps, args.rows, seed=0)
        except ImportError as exc:
            print(f"{cls.name}: not importable ({exc})")
            continue
        c = r["compile"]
        print(f"{r['lib']:14s} setup {r['setup']*1e3:8.1f} ms | compile p50 {_pct(c, .5)*1e3:8.2f} ms "
              f"p99 {_pct(c, .99)*1e3:8.2f} max {max(c)*1e3:8.2f} ms | mask x{args.rows} seq "
              f"{r.get('seq', float('nan'))*1e3:7.3f} ms batch {r.get('batch', float('nan'))*1e3:7.3f} ms",
              flush=True)
        out.append(r)
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
