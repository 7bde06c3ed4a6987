"""Structured output: constrain decoding to a JSON schema, any JSON object, a regular expression,
one of a list of choices or a context-free grammar (issue 16).

    spec.py      Constraint: what a request asked for (pure data, hashable: the cache key)
    grammar.py   the one module that imports the grammar library (llguidance)
    compiler.py  Constraint -> CompiledGrammar, off the engine thread, bounded in time, LRU-cached
    masks.py     per step: the allowed-token bitmask of every constrained row, computed in a worker
                 thread while the forward runs, applied to the logits as -inf by the sampler
"""
