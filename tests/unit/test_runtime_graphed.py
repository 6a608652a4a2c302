"""Which models StaticDecoder may capture as a CUDA graph (exl2conv/runtime/graphed.py,
capturable): the rules on configs alone; the decoding itself is checked in
tests/e2e/test_runtime_graphed.py and on the device in tests/gpu/test_runtime_graphed.py."""

import types

import pytest

from exl2conv.runtime.graphed import capturable

transformers = pytest.importorskip("transformers")


def model_of(config):
    return types.SimpleNamespace(config=config, modules=lambda: [])


def test_a_plain_dense_model_is_capturable():
    assert capturable(model_of(transformers.LlamaConfig())) is None
    assert capturable(model_of(transformers.Qwen2Config())) is None  # its window is off by default


@pytest.mark.parametrize("config, says", [
    (lambda: transformers.MistralConfig(), "sliding-window"),
    (lambda: transformers.Gemma2Config(), "sliding-window"),
    (lambda: transformers.LlamaConfig(rope_scaling={"rope_type": "dynamic", "factor": 2.0}), "rotary"),
    (lambda: transformers.Qwen2VLConfig(), "vision-language"),
])
def test_what_is_not_captured_says_why(config, says):
    assert says in capturable(model_of(config()))


def test_experts_are_not_captured():
    from exl2conv.runtime.modules import Exl2Experts

    experts = Exl2Experts.__new__(Exl2Experts)  # only its type is looked at
    model = types.SimpleNamespace(config=transformers.LlamaConfig(), modules=lambda: [experts])
    assert "experts" in capturable(model)
