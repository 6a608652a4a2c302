"""The measurement's corrected candidate forwards (exl2conv.candidates) give the errors that the
plain float32 forwards give: exactly up to float32 rounding with float32 corrections, and to about
three digits with the bfloat16 corrections the GPU uses."""

import pytest
import torch

from exl2conv.candidates import CandidateScorer
from exl2conv.layers import ModuleRun, run_block
from exl2conv.model import WeightIndex, forward, layer_linears, load_config
from tests.tinymodel import make_tiny_llama


def module(src, part, layer=1):
    cfg, index = load_config(src), WeightIndex(src)
    w = forward.load_layer_weights(index, cfg, layer, part, "cpu")
    return cfg, w, layer_linears(cfg, layer, part), layer


def perturbed(w, keys, scale, seed):
    g = torch.Generator().manual_seed(seed)
    trial = dict(w)
    for key in keys:
        trial[key] = w[key] + torch.randn(w[key].shape, generator=g) * scale * w[key].std()
    return trial


def check(cfg, w, specs, layer, part, tol_f32=1e-5, tol_bf16=2e-2, frozen=frozenset()):
    g = torch.Generator().manual_seed(3)
    states = torch.randn(5, 24, cfg.hidden_size, generator=g) * 3
    run = ModuleRun(part, w, specs, cfg, forward.RotaryCache(cfg), 2, layer)
    y_ref, _ = run_block(run, states)
    keys = list(specs)
    weight = torch.rand(cfg.hidden_size, generator=g) + 0.1
    plain = CandidateScorer(run, states, y_ref, weight, corrected=False)
    exact = CandidateScorer(run, states, y_ref, weight, corrected=True, low=torch.float32, frozen=frozen)
    fast = CandidateScorer(run, states, y_ref, weight, corrected=True, low=torch.bfloat16, frozen=frozen)
    assert exact.corrected and fast.corrected and not plain.corrected
    for seed, scale in enumerate((0.3, 0.03, 0.003)):
        trial = perturbed(w, keys, scale, seed)
        want = plain.errors(trial)
        assert want.min() > 0
        torch.testing.assert_close(exact.errors(trial), want, rtol=tol_f32, atol=0)
        got = fast.errors(trial)
        torch.testing.assert_close(got, want, rtol=tol_bf16, atol=0)
        assert not torch.equal(got, want)  # the bfloat16 corrections really ran
    # unchanged weights: no error at all
    assert exact.errors(dict(w)).abs().max() == 0


@pytest.mark.parametrize("part", ["attn", "mlp"])
def test_corrected_errors_equal_plain_llama(tmp_path, part):
    src = make_tiny_llama(tmp_path / "m", seed=4, hidden=64, intermediate=128, layers=2)
    check(*module(src, part), part)


@pytest.mark.parametrize("arch", ["Gemma2ForCausalLM", "Qwen3ForCausalLM", "Phi3ForCausalLM", "MixtralForCausalLM"])
def test_corrected_errors_equal_plain_other_archs(tmp_path, arch):
    """Post-norms after o_proj/down (Gemma2), q/k head norms (Qwen3), split fused linears (Phi-3)
    and routed experts (Mixtral) all sit between or after the corrected linears."""
    pytest.importorskip("transformers")
    from tests.tinymodel import make_tiny_hf

    if arch == "MixtralForCausalLM":
        from tests.tinymodel import make_tiny_mixtral
        src = make_tiny_mixtral(tmp_path / "m", dtype=torch.float32)
    else:
        src = make_tiny_hf(tmp_path / "m", arch, seed=2, dtype=torch.float32)
    for part in ("attn", "mlp"):
        check(*module(src, part, layer=0), part)


@pytest.mark.parametrize("branch", ["attn", "mlp"])
def test_corrected_errors_equal_plain_parallel_block(tmp_path, branch):
    """A parallel block (Cohere) scored one branch at a time: the other branch's linears are
    frozen at their recorded outputs (their input, the block's normed input, no candidate changes).
    Without ``frozen`` the scorer has no reference weights for them and fails."""
    pytest.importorskip("transformers")
    from tests.tinymodel import make_tiny_hf

    src = make_tiny_hf(tmp_path / "m", "CohereForCausalLM", seed=2, dtype=torch.float32)
    cfg, index = load_config(src), WeightIndex(src)
    w = forward.load_layer_weights(index, cfg, 0, "parallel", "cpu")
    specs = layer_linears(cfg, 0, branch)
    check(cfg, w, specs, 0, "parallel", frozen=frozenset(layer_linears(cfg, 0)) - specs.keys())


def scoring_setup(tmp_path, part, seed: int, draws: int):
    """A tiny Llama module with 5 rows of states, its reference outputs and error weights, and the
    generator that drew them (for more draws)."""
    src = make_tiny_llama(tmp_path / "m", seed=seed, hidden=64, intermediate=128, layers=2)
    cfg, w, specs, layer = module(src, part)
    g = torch.Generator().manual_seed(draws)
    states = torch.randn(5, 24, cfg.hidden_size, generator=g) * 3
    run = ModuleRun(part, w, specs, cfg, forward.RotaryCache(cfg), 2, layer)
    y_ref, _ = run_block(run, states)
    weight = torch.rand(cfg.hidden_size, generator=g) + 0.1
    return run, states, y_ref, weight, g


@pytest.mark.parametrize("part", ["attn", "mlp"])
@pytest.mark.parametrize("low", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("with_fisher", [False, True])
def test_table_scoring_chunk_by_chunk_gives_the_same_bits(tmp_path, part, low, with_fisher):
    """errors_table on a ``table`` scorer (one chunk's recording held at a time, what the
    measurement uses) gives bit for bit the errors of one candidate at a time against a recording
    of every chunk; candidates given as float16 (as the measurement keeps them), three chunks of
    2 + 2 + 1 rows, rows of the table sharing some candidates."""
    run, states, y_ref, weight, g = scoring_setup(tmp_path, part, seed=5, draws=7)
    cfg, w, specs = run.cfg, run.weights, run.specs
    fisher = torch.rand(cfg.hidden_size, generator=g) if with_fisher else None
    keys = list(specs)
    options = [perturbed(w, keys, scale, seed) for seed, scale in enumerate((0.3, 0.03, 0.003))]
    trials = [{**w, **{k: options[(i + j) % 3][k].half() for j, k in enumerate(keys)}} for i in range(4)]
    trials.append(dict(trials[0]))  # a row whose candidates are all the previous rows' tensors
    rows = CandidateScorer(run, states, y_ref, weight, corrected=True, low=low, fisher=fisher)
    table = CandidateScorer(run, states, y_ref, weight, corrected=True, low=low, fisher=fisher, table=True)
    assert len(rows.recorded) == 3 and len(table.recorded) == 1
    want = torch.stack([rows.errors(t) for t in trials])
    got = table.errors_table(trials)
    assert got.shape == ((5, 5) if fisher is None else (5, 5, 2))
    assert torch.equal(got, want)
    assert torch.equal(table.errors(trials[1]), want[1])  # and once more, recording again
    assert want.min() > 0


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_layer_weights_held_in_their_two_byte_source_dtype(tmp_path, dtype):
    """With ``compact`` a module's linears are read in their float16 or bfloat16 source dtype
    (float32 sources stay float32), the same values; norms, biases and the rest stay float32."""
    src = make_tiny_llama(tmp_path / "m", seed=6, dtype=dtype, attention_bias=True)
    cfg, index = load_config(src), WeightIndex(src)
    for part in ("attn", "mlp"):
        specs = layer_linears(cfg, 1, part)
        full = forward.load_layer_weights(index, cfg, 1, part, "cpu")
        held = forward.load_layer_weights(index, cfg, 1, part, "cpu", compact=True)
        assert full.keys() == held.keys()
        for k, v in held.items():
            assert v.dtype == (dtype if k in specs and dtype != torch.float32 else torch.float32), k
            assert torch.equal(v.float(), full[k]), k


@pytest.mark.parametrize("part", ["attn", "mlp"])
@pytest.mark.parametrize("low", [torch.float32, torch.bfloat16])
def test_scoring_with_compact_weights_gives_the_same_bits(tmp_path, part, low):
    """On a GPU a module's linears stay in their float16 source dtype (WeightIndex.held_dtype);
    the recording and the corrections widen them exactly, so every error is bit for bit what
    the float32 weights give."""
    run, states, y_ref, weight, _ = scoring_setup(tmp_path, part, seed=6, draws=8)
    w, specs = run.weights, run.specs
    keys = list(specs)
    trials = [{**w, **{k: v.half() for k, v in perturbed(w, keys, scale, seed).items() if k in keys}}
              for seed, scale in enumerate((0.3, 0.03))]
    small = {**w, **{k: w[k].half() for k in keys}}
    assert all(torch.equal(small[k].float(), w[k]) for k in keys)  # float16 sources: exact
    full = CandidateScorer(run, states, y_ref, weight, corrected=True, low=low, table=True)
    half = CandidateScorer(run.replace(weights=small), states, y_ref, weight, corrected=True, low=low, table=True)
    want = full.errors_table(trials)
    assert want.min() > 0
    assert torch.equal(half.errors_table([{**small, **{k: t[k] for k in keys}} for t in trials]), want)
