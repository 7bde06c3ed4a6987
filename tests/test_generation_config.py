"""Sampling defaults from generation_config.json (model/generation_config.py) and how a request's
own fields override them (api/convert.sampling_params, shared by gRPC and HTTP)."""

from __future__ import annotations

import json

import pytest

from loraplex.api import convert
from loraplex.api.pb.loraplex.v1 import generation_pb2 as pb
from loraplex.engine.request import InvalidRequestError
from loraplex.model.generation_config import NEUTRAL, SamplingDefaults, read_sampling_defaults, resolve_sampling_defaults


def write(folder, **fields):
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "generation_config.json").write_text(json.dumps({"bos_token_id": 1, **fields}))
    return folder


def test_auto_reads_the_model_folder(tmp_path):
    model = write(tmp_path / "m", temperature=0.6, top_p=0.9, top_k=50, repetition_penalty=1.1, do_sample=True)
    d = resolve_sampling_defaults("auto", model)
    assert d.as_kwargs() == {"temperature": 0.6, "top_p": 0.9, "top_k": 50, "repetition_penalty": 1.1}
    assert d.source == str(model / "generation_config.json")
    assert resolve_sampling_defaults("neutral", model) is NEUTRAL
    assert resolve_sampling_defaults("vllm", model) is NEUTRAL


def test_auto_without_file_or_fields_is_neutral(tmp_path):
    assert resolve_sampling_defaults("auto", tmp_path) is NEUTRAL
    assert resolve_sampling_defaults("auto", write(tmp_path / "m", do_sample=False)) is NEUTRAL
    assert NEUTRAL.effective() == {"temperature": 1.0, "top_p": 1.0, "top_k": 0, "repetition_penalty": 1.0}


def test_folder_choice(tmp_path):
    other = write(tmp_path / "other", temperature=0.2)
    assert resolve_sampling_defaults(str(other), tmp_path / "model").as_kwargs() == {"temperature": 0.2}
    with pytest.raises(ValueError, match="generation_config: .* holds no generation_config.json"):
        resolve_sampling_defaults(str(tmp_path / "empty"), tmp_path)


@pytest.mark.parametrize("fields, message", [
    ({"temperature": -1}, "temperature"), ({"top_p": 0}, "top_p"), ({"top_k": 1.5}, "top_k"),
    ({"temperature": "hot"}, "temperature"), ({"repetition_penalty": 0}, "repetition_penalty")])
def test_bad_values_stop_start_up_naming_file_and_field(tmp_path, fields, message):
    folder = write(tmp_path / "m", **fields)
    with pytest.raises(ValueError, match=f"generation_config: .*generation_config.json.*{message}"):
        read_sampling_defaults(folder / "generation_config.json")


def test_request_fields_override_the_defaults():
    defaults = SamplingDefaults(temperature=0.0, top_k=20, source="x")
    unset = convert.sampling_from_proto(pb.SamplingParams(), 100, defaults)
    assert unset.temperature == 0.0 and unset.top_k == 20 and unset.top_p == 1.0
    own = convert.sampling_from_proto(pb.SamplingParams(temperature=0.7, top_k=0), 100, defaults)
    assert own.temperature == pytest.approx(0.7) and own.top_k == 0
    with pytest.raises(InvalidRequestError, match="^sampling.top_p: "):
        convert.sampling_from_proto(pb.SamplingParams(top_p=2.0), 100, defaults)
    info = convert.sampling_defaults_to_proto(defaults)
    assert info.temperature == 0.0 and info.top_k == 20 and info.top_p == 1.0 and info.source == "x"
