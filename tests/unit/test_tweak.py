"""Norm tweaking (exl2conv.tweak): when the quantized weights lose a per-channel scale of their
input, the tweak finds it back in the norm; it never raises its loss; what it returns is what the
model file stores."""

import pytest
import torch

from exl2conv import cli, tweak
from exl2conv.errors import Exl2Error
from exl2conv.layers import ModuleRun
from exl2conv.model import WeightIndex, forward, layer_linears, load_config
from exl2conv.model.arch import final_norm_tensor, head_spec
from tests.tinymodel import make_tiny_llama


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    src = make_tiny_llama(tmp_path_factory.mktemp("m") / "m", seed=7, hidden=32, intermediate=64, layers=1)
    cfg, index = load_config(src), WeightIndex(src)
    x = torch.randn(3, 16, cfg.hidden_size, generator=torch.Generator().manual_seed(2))
    return cfg, index, x


def scaled_columns(w: dict, keys, d: torch.Tensor) -> dict:
    """The linears ``keys`` with input column c divided by ``1 + d[c]``: exactly what a norm weight
    times ``1 + d`` undoes."""
    out = dict(w)
    for k in keys:
        out[k] = w[k] / (1 + d)
    return out


@pytest.mark.parametrize("kind,keys", [("attn", ("q_proj", "k_proj", "v_proj")), ("mlp", ("gate_proj", "up_proj"))])
def test_tweak_recovers_a_lost_input_scale(tiny, kind, keys):
    cfg, index, x = tiny
    w = forward.load_layer_weights(index, cfg, 0, kind)
    rope = forward.rope_tables(cfg, x.shape[1])
    target, _ = forward.BLOCKS[kind](x, w, cfg, rope, layer=0)
    d = 0.03 * torch.randn(cfg.hidden_size, generator=torch.Generator().manual_seed(3))
    broken = scaled_columns(w, keys, d)
    run = ModuleRun(kind, broken, layer_linears(cfg, 0, kind), cfg, rope, 2, 0)
    g, before, after = tweak.tweak_norm(run, x, target, None, steps=200, lr=2e-3)
    key = tweak.norm_key(kind, cfg)
    assert after < 0.02 * before, (before, after)
    want = w[key] * (1 + d)
    assert float((g - want).norm() / (w[key] - want).norm()) < 0.1


def test_tweak_never_raises_its_loss_and_returns_stored_values(tiny):
    cfg, index, x = tiny
    w = forward.load_layer_weights(index, cfg, 0, "mlp")
    target = x + 0.1 * torch.randn(x.shape, generator=torch.Generator().manual_seed(4))  # not reachable
    run = ModuleRun("mlp", w, layer_linears(cfg, 0, "mlp"), cfg, None, 3, 0)
    g, before, after = tweak.tweak_norm(run, x, target, None, steps=5, lr=0.5)
    assert after <= before
    assert torch.equal(g, tweak.stored(g, cfg.norm_offset).float() + cfg.norm_offset)
    # a target the module already meets: the initial weight stays (rounded as stored)
    exact, _ = forward.mlp(x, w, cfg)
    g, before, after = tweak.tweak_norm(run, x, exact, None, steps=3)
    assert before == after == 0.0
    key = tweak.norm_key("mlp", cfg)
    assert torch.equal(g, w[key].half().float())


def test_final_norm_tweak_lowers_the_kl_of_a_scaled_head(tiny):
    cfg, index, x = tiny
    g0 = forward.load_norm(index, cfg, final_norm_tensor(cfg))
    head = index.get(head_spec(cfg, index).tensor)
    d = 0.05 * torch.randn(cfg.hidden_size, generator=torch.Generator().manual_seed(6))
    x_q = x + 0.01 * torch.randn(x.shape, generator=torch.Generator().manual_seed(8))
    g, before, after = tweak.tweak_final_norm(x_q, x, g0, head, head / (1 + d), cfg, steps=100, lr=5e-3)
    assert after < 0.3 * before, (before, after)
    # the KL it reports is the KL of the distributions
    logp = lambda h, gw, hw: torch.log_softmax(  # noqa: E731
        forward.logits(forward.final_norm(h, gw, cfg), hw, cfg)[..., :cfg.vocab_size], -1)
    ref, got = logp(x, g0, head), logp(x_q, g, head / (1 + d))
    kl = float((ref.exp() * (ref - got)).sum(-1).mean())
    assert kl == pytest.approx(after, rel=0.05, abs=1e-7)


def test_rows_for_caps_tokens_by_device_and_layer_size():
    smol, llama7b = 3_540_000, 202_375_168  # weights per decoder layer
    assert tweak.rows_for(100, 2048, torch.device("cuda"), smol) == 16
    assert tweak.rows_for(100, 2048, torch.device("cuda"), llama7b) == 1
    assert tweak.rows_for(100, 128, torch.device("cuda"), llama7b) == 5  # 648 tokens
    assert tweak.rows_for(100, 128, torch.device("cpu"), smol) == 4
    assert tweak.rows_for(2, 8192, torch.device("cpu"), smol) == 1


def test_tweak_tokens_env_sets_the_budget_on_any_device(monkeypatch):
    smol = 3_540_000
    monkeypatch.setenv("EXL2CONV_TWEAK_TOKENS", "32768")
    assert tweak.rows_for(100, 2048, torch.device("cpu"), smol) == 16   # the GPU's default on a CPU
    monkeypatch.setenv("EXL2CONV_TWEAK_TOKENS", "512")
    assert tweak.rows_for(100, 256, torch.device("cuda"), smol) == 2    # the CPU's default on a GPU
    assert tweak.rows_for(100, 2048, torch.device("cuda"), smol) == 1   # at least one row
    monkeypatch.setenv("EXL2CONV_TWEAK_TOKENS", "32768")
    assert tweak.rows_for(100, 128, torch.device("cpu"), 202_375_168) == 5  # WORK still caps it: 648 tokens
    for bad in ("0", "-5", "many", "1.5"):
        monkeypatch.setenv("EXL2CONV_TWEAK_TOKENS", bad)
        with pytest.raises(Exl2Error, match="EXL2CONV_TWEAK_TOKENS"):
            tweak.rows_for(100, 256, torch.device("cpu"), smol)


def test_bad_tweak_tokens_is_refused_before_any_work(tmp_path, monkeypatch, capsys):
    model = make_tiny_llama(tmp_path / "model")
    monkeypatch.setenv("EXL2CONV_TWEAK_TOKENS", "lots")
    code = cli.main(["-i", str(model), "-o", str(tmp_path / "work"), "-om", str(tmp_path / "m.json")])
    assert code == 1
    assert capsys.readouterr().err.strip() == (" ## Error: EXL2CONV_TWEAK_TOKENS=lots: give a positive number of "
                                               "tokens (or leave it unset)").strip()
    assert not (tmp_path / "work").exists()


def test_adam_takes_torch_adams_steps():
    """tweak.Adam (which spares every conversion TorchDynamo's import) against torch.optim.Adam."""
    gen = torch.Generator().manual_seed(5)
    grads = [torch.randn(7, generator=gen) for _ in range(12)]
    ours = torch.zeros(7, requires_grad=True)
    theirs = torch.zeros(7, requires_grad=True)
    opt, ref = tweak.Adam(ours, lr=2e-3), torch.optim.Adam([theirs], lr=2e-3, foreach=False)
    for g in grads:
        ours.grad, theirs.grad = g.clone(), g.clone()
        opt.step()
        ref.step()
        assert torch.equal(ours, theirs)
    assert float(ours.abs().max()) > 0


def test_final_norm_spans():
    """The final norm's fit goes through its positions in spans: SmolLM2's 16 rows of 2048 in 16
    spans of 2048, a Llama-2-7B's one row in 4 of 512, never over 2048 or under 512 (but for
    fewer positions in all)."""
    from exl2conv.tweak import head_span

    assert head_span(16 * 2048) == 2048 and head_span(2048) == 512
    assert head_span(64 * 2048) == 2048 and head_span(100) == 512 and head_span(12000) == 750
