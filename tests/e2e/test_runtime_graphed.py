"""StaticDecoder (exl2conv/runtime/graphed.py) on the CPU, where its step runs eagerly: the static
cache, positions and 4D mask give the logits of a full forward over the same tokens and the
greedy tokens of generate(); the check fails when the mask hides a key it should show. The CUDA
graph replay of the same step: tests/gpu/test_runtime_graphed.py."""

import pytest
import torch

from exl2conv.runtime import Exl2ForCausalLM
from exl2conv.runtime.graphed import StaticDecoder, capturable

pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def model(tiny_exl2):
    return Exl2ForCausalLM.from_quantized(tiny_exl2[0], dtype=torch.float32)


@pytest.fixture(scope="module")
def prompt():
    return torch.randint(0, 258, (1, 6), generator=torch.Generator().manual_seed(0))


def stepped_logits(dec: StaticDecoder, prompt: torch.Tensor, tokens: list[int]) -> torch.Tensor:
    rows = [dec.prefill(prompt)[0].clone()]
    for t in tokens[:-1]:
        rows.append(dec.step(torch.tensor([t]))[0].clone())
    return torch.stack(rows)


def test_greedy_matches_generate(model, prompt):
    tokens = StaticDecoder(model, 32).greedy(prompt, 10)
    ref = model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=10, do_sample=False,
                         pad_token_id=0)
    assert tokens == ref[0, prompt.shape[1]:].tolist()


def test_step_logits_match_a_full_forward(model, prompt):
    tokens = StaticDecoder(model, 32).greedy(prompt, 8)
    with torch.inference_mode():
        full = model(input_ids=torch.cat([prompt, torch.tensor([tokens])], 1)).logits[0]
    n = prompt.shape[1]
    got = stepped_logits(StaticDecoder(model, 32), prompt, tokens)
    assert (got - full[n - 1:n - 1 + len(tokens)]).abs().max() < 1e-4


def test_the_check_fails_when_the_mask_hides_a_key(model, prompt, monkeypatch):
    tokens = StaticDecoder(model, 32).greedy(prompt, 8)
    with torch.inference_mode():
        full = model(input_ids=torch.cat([prompt, torch.tensor([tokens])], 1)).logits[0]
    n = prompt.shape[1]
    dec = StaticDecoder(model, 32)
    real_step = StaticDecoder.step

    def step_hiding_the_first_key(self, token):
        self.mask[..., 0] = torch.finfo(self.dtype).min
        return real_step(self, token)

    monkeypatch.setattr(StaticDecoder, "step", step_hiding_the_first_key)
    got = stepped_logits(dec, prompt, tokens)
    assert (got - full[n - 1:n - 1 + len(tokens)]).abs().max() > 1e-2


def test_limits_and_capture_rules(model, prompt):
    dec = StaticDecoder(model, 8)
    with pytest.raises(ValueError, match="step before prefill"):
        dec.step(torch.tensor([1]))
    with pytest.raises(ValueError, match="one row of 1 to 7"):
        dec.prefill(torch.zeros((1, 8), dtype=torch.long))
    dec.prefill(prompt)  # 6 of 8 positions
    dec.step(torch.tensor([1]))
    dec.step(torch.tensor([1]))
    with pytest.raises(ValueError, match="static cache is full"):
        dec.step(torch.tensor([1]))
    assert capturable(model) is None
    assert not dec.use_graph  # the CPU runs the step eagerly
    with pytest.raises(ValueError, match="not on a CUDA device"):
        StaticDecoder(model, 8, graph=True)


def test_stream_stops_at_the_generation_configs_eos_as_generate_does(model, tiny_exl2):
    """exl2conv generate's stream() goes through StaticDecoder for this model; with the third greedy
    token made the end of sequence it stops there, as transformers' generate() does."""
    import io

    from transformers import AutoTokenizer

    from exl2conv.runtime.generate import stream

    tok = AutoTokenizer.from_pretrained(str(tiny_exl2[0]))
    ids = tok("Hello", return_tensors="pt").input_ids
    free = StaticDecoder(model, 64).greedy(ids, 8)
    old = model.generation_config.eos_token_id
    model.generation_config.eos_token_id = [free[2]]
    try:
        new, _ = stream(model, tok, "Hello", 8, io.StringIO())
        ref = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=8, do_sample=False,
                             pad_token_id=0)
    finally:
        model.generation_config.eos_token_id = old
    assert new == ref.shape[1] - ids.shape[1] == free.index(free[2]) + 1


def test_warm_up_runs_leave_the_cache_as_they_found_it(model, prompt):
    """The graph's capture runs the first step eagerly twice before capturing it; the steps after
    must still give a full forward's logits (transformers' StaticLayer advances its own counter at
    every run: without putting it back they would write and read the wrong cache slots)."""
    tokens = StaticDecoder(model, 32).greedy(prompt, 8)
    with torch.inference_mode():
        full = model(input_ids=torch.cat([prompt, torch.tensor([tokens])], 1)).logits[0]
    n = prompt.shape[1]
    dec = StaticDecoder(model, 32)
    rows = [dec.prefill(prompt)[0].clone()]
    for i, t in enumerate(tokens[:-1]):
        if i == 0:  # what _capture does before capturing, here on the CPU
            dec.ids.copy_(torch.tensor([[t]]))
            dec.pos.fill_(dec.length)
            dec.mask[..., dec.length] = 0
            with torch.inference_mode():
                dec._warm_up()
        rows.append(dec.step(torch.tensor([t]))[0].clone())
    assert (torch.stack(rows) - full[n - 1:n - 1 + len(tokens)]).abs().max() < 1e-4
