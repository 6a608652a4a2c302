"""exl2conv.asymmetric: o_proj / down_proj fitted to the unquantized module's outputs in the
quantization pass (EXL2CONV_ASYMMETRIC=1)."""

import pytest
import torch

from exl2conv import asymmetric, measure, quantize, settings
from exl2conv.layers import ModuleRun
from exl2conv.model import WeightIndex, forward, layer_linears, load_config
from exl2conv.pack import decode_linear
from tests.tinymodel import make_tiny_llama


def _module(tmp_path, part):
    src = make_tiny_llama(tmp_path / "m", seed=1, hidden=64, intermediate=96, layers=1)
    cfg, index = load_config(src), WeightIndex(src)
    w = forward.load_layer_weights(index, cfg, 0, part, "cpu")
    run = ModuleRun(part, w, layer_linears(cfg, 0, part), cfg, forward.RotaryCache(cfg), 4, 0)
    states = torch.randn(6, 16, cfg.hidden_size, generator=torch.Generator().manual_seed(0))
    entry = measure.measure_module(run, states)[0][1]  # a low setting: errors to cancel
    return run, states, entry


def _quantized(run, states, entry, on: bool):
    saved = {}
    with settings.use(settings.Settings(tweak=False, asymmetric=on)):
        y, rfn, _, _ = quantize.quantize_module(run, states.clone(), entry, lambda n, t: saved.setdefault(n, t))
    return y, rfn, saved


@pytest.mark.parametrize("part", ["attn", "mlp"])
def test_the_second_linear_cancels_the_first_ones_error(tmp_path, part):
    run, states, entry = _module(tmp_path, part)
    _, plain, saved_plain = _quantized(run, states, entry, False)
    y, fitted, saved = _quantized(run, states, entry, True)
    assert fitted < 0.97 * plain  # on its own rows: the descent's objective is the module's output
    second = next(s for s in run.specs.values() if asymmetric.applies(run, s))
    for name, t in saved.items():  # valid EXL2: packed, decoded by the pass's own check, same layout
        assert set(t) == set(saved_plain[name])
        decode_linear(t, name)
    first = next(s for s in run.specs.values() if not asymmetric.applies(run, s))
    assert all(torch.equal(saved[first.name][k], saved_plain[first.name][k]) for k in saved[first.name])
    assert not torch.equal(saved[second.name]["q_weight"], saved_plain[second.name]["q_weight"])
    assert torch.equal(_quantized(run, states, entry, True)[0], y)  # deterministic


def test_the_setting_is_recorded_only_when_on_and_a_resume_across_it_refused():
    off, on = settings.Settings().recorded("cpu"), settings.Settings(asymmetric=True).recorded("cpu")
    assert "asymmetric" not in off and on["asymmetric"] is True
    assert settings.differences(on, off) and settings.differences(off, on)
    assert not settings.differences(on, on)
    assert settings.Settings.from_env({"EXL2CONV_ASYMMETRIC": "1"}).asymmetric
    with pytest.raises(Exception):
        settings.Settings.from_env({"EXL2CONV_ASYMMETRIC": "yes"})
