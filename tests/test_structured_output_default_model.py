"""Structured output on the real default model (SmolLM2-135M-Instruct): `json_object` and a JSON
schema on chat prompts, greedy. Unlike the tiny random model, a real model writes strings and
keys it chooses to close, so "any JSON object" can be checked to parse, not just to start well."""

from __future__ import annotations

import json

import jsonschema
import pytest
import torch

from loraplex.api.convert import render_chat
from loraplex.config import EngineConfig
from loraplex.engine.engine import Engine
from loraplex.engine.request import FinishReason, Request, SamplingParams
from loraplex.engine.structured.spec import Constraint, Kind
from loraplex.model.loader import load_model
from tests.fixtures.engine_run import run_requests

pytestmark = [pytest.mark.real_model, pytest.mark.slow, pytest.mark.usefixtures("one_torch_thread"),
              pytest.mark.timeout(600)]

PERSON = {"type": "object", "properties": {"name": {"type": "string", "maxLength": 20},
                                           "age": {"type": "integer", "minimum": 0, "maximum": 150}},
          "required": ["name", "age"], "additionalProperties": False}


def test_json_object_and_schema_on_the_default_model(default_model_dir):
    loaded = load_model(default_model_dir, torch.float32, "cpu")
    engine = Engine(loaded, EngineConfig(num_kv_blocks=128, max_model_len=512))
    engine.start()
    jobs = {
        "object": (Constraint(Kind.JSON_OBJECT, field="response_format"),
                   "Describe a cat as a JSON object with a name and a color."),
        "schema": (Constraint.json_schema(PERSON, "response_format.json_schema.schema"),
                   "Give me a person with a name and an age, as JSON."),
    }
    try:
        reqs = {key: Request(key, render_chat([{"role": "user", "content": content}], loaded.tokenizer),
                             SamplingParams(max_new_tokens=120, temperature=0.0), constraint=c)
                for key, (c, content) in jobs.items()}
        results = {k: (v[0], v[2]) for k, v in run_requests(engine, reqs, timeout=500).items()}
    finally:
        engine.shutdown(1)
    text, reason = results["object"]
    assert reason in (FinishReason.GRAMMAR, FinishReason.EOS), (reason, text)
    assert isinstance(json.loads(text), dict) and json.loads(text), text
    text, reason = results["schema"]
    assert reason in (FinishReason.GRAMMAR, FinishReason.EOS), (reason, text)
    jsonschema.validate(json.loads(text), PERSON)
