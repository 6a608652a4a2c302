"""Checks of the EXL2 runtime (exl2conv.runtime) on a converted folder, shared by the tests that
convert each architecture (tests/e2e/test_runtime.py, test_architectures.py,
test_moe_architectures.py): logits against the float32 decoded forward `exl2conv eval` runs
(evaluate.decoded_logits), greedy generate() against that forward token by token, and the wrong
variants of the loader each check is shown to fail on."""

import pytest
import torch

from exl2conv.evaluate import decoded_logits
from exl2conv.runtime import Exl2ForCausalLM

# float32: the same float32 operations in another order (transformers' attention and norms) and
# the same decoded weights: ~3e-7 of the largest logit measured; 1e-5 leaves room for other BLAS.
F32_BOUND = 1e-5
# float16: activations between the modules round to fp16 (2^-11 = 4.9e-4 relative each); about
# ten roundings lie on any path to a logit (embedding, per layer: norm, q/k/v, attention, o_proj,
# residual, norm, gate/up, down, residual; final norm, head), so FP16 noise reaches ~10 * 2^-11 =
# 5e-3 of the logits' scale. Measured: 8e-4.
F16_BOUND = 5e-3


def check_logits(model, ids, reference, bound):
    """Largest logit difference, relative to the largest logit, within ``bound``."""
    with torch.no_grad():
        got = model(ids).logits.float()
    assert got.shape == reference.shape
    err = float((got - reference).abs().max() / reference.abs().max())
    assert err < bound, f"logits off by {err:.2e} of the largest, bound {bound:.0e}"


def greedy_reference(out, prompt, steps):
    """Greedy tokens from the decoded forward, the whole row again for each one."""
    row = prompt.clone()
    for _ in range(steps):
        nxt = decoded_logits(out, row)[:, -1].argmax(-1, keepdim=True)
        row = torch.cat((row, nxt), dim=-1)
    return row


def check_generate(model, out, prompt, steps=8):
    """Greedy generate() gives the decoded forward's greedy tokens, up to and with the first EOS,
    where it stops (forcing ``steps`` tokens with min_new_tokens would mask the EOS that the
    reference picks: a tiny Qwen2-VL's picks one within 4 tokens)."""
    kw = dict(max_new_tokens=steps, do_sample=False)
    first = model.generate(prompt, **kw)
    assert torch.equal(model.generate(prompt, **kw), first)  # deterministic
    assert first.shape[1] > prompt.shape[1]
    assert torch.equal(first, greedy_reference(out, prompt, steps)[:, :first.shape[1]])
    check_static_decoder(model, prompt, first[0, prompt.shape[1]:].tolist(), steps)


def check_static_decoder(model, prompt, want: list[int], steps: int) -> None:
    """Where `exl2conv generate` decodes through StaticDecoder (exl2conv/runtime/graphed.py), its
    greedy tokens are generate()'s, stopping at the same EOS."""
    from exl2conv.runtime.graphed import StaticDecoder, capturable

    if capturable(model) is not None:
        return
    eos = model.generation_config.eos_token_id
    eos = {eos} if isinstance(eos, int) else set(eos or ())
    got = StaticDecoder(model, prompt.shape[1] + steps).greedy(prompt, steps, eos)
    assert got == want, f"StaticDecoder's tokens {got}, generate()'s {want}"


def _ignore_invperm(monkeypatch):
    from exl2conv import ops

    real = ops.exl2_dequant_ref  # the torch path's decoder (Exl2Linear.decoded, through ops.exl2_dequant)

    def wrong(tensors):
        k = tensors["q_invperm"].numel()
        return real(dict(tensors, q_invperm=torch.arange(k, dtype=torch.int32)))

    monkeypatch.setattr(ops, "exl2_dequant_ref", wrong)


def _bias_as_stored(monkeypatch):
    import exl2conv.runtime.model as m

    monkeypatch.setattr(m, "mlp_bias_from_runtime_order", lambda bias, invperm: bias)


# -- every architecture: one check, run on their outputs by the tests that convert each
# (test_architectures.py, test_moe_architectures.py), so that no conversion is added for it -------

def _fused_parts_reversed(monkeypatch):
    """A fused linear's parts concatenated in the wrong order (k, v before q; up before gate)."""
    import exl2conv.runtime.modules as mod

    real = mod.FusedExl2Linear.__init__
    monkeypatch.setattr(mod.FusedExl2Linear, "__init__", lambda self, parts: real(self, parts[::-1]))


def _expert_gate_up_swapped(monkeypatch):
    """Each expert's gate and up linears taken for one another."""
    import exl2conv.runtime.model as m

    real = m.Exl2Experts
    monkeypatch.setattr(m, "Exl2Experts",
                        lambda linears, names, act: real(linears, (names[1], names[0], names[2]), act))


def _wrong_plain(monkeypatch, change):
    import exl2conv.runtime.model as m

    real = m._plain_tensor
    monkeypatch.setattr(m, "_plain_tensor", lambda where, key, *a: change(key, real(where, key, *a)))


def _norm_offset_removed(monkeypatch):
    """Gemma's norms loaded as w - 1, as if the files held the factor 1 + w the norms multiply by
    (they hold w, as Gemma's checkpoints do, and the class adds the 1)."""
    _wrong_plain(monkeypatch, lambda key, t: t - 1 if key.endswith("norm.weight") else t)


def _head_norms_shared(monkeypatch):
    """Cohere's per-head q/k norms ([heads, head_dim]) all given the first head's."""
    _wrong_plain(monkeypatch, lambda key, t: t[:1].expand_as(t).clone() if t.dim() == 2 and "_norm" in key else t)


def _entry_changed(monkeypatch, arch: str, **changes):
    """The runtime table's entry for ``arch`` with ``changes`` (dataclasses.replace)."""
    import dataclasses

    from exl2conv.runtime.architectures import RUNTIME

    monkeypatch.setitem(RUNTIME, arch, dataclasses.replace(RUNTIME[arch], **changes))


def _renames_swapped(arch: str, a: str, b: str):
    """``arch``'s renames with the targets of the sources containing ``a`` and ``b`` exchanged
    (Yi's two norms, InternLM2's gate and up)."""
    def variant(monkeypatch):
        from exl2conv.runtime.architectures import RUNTIME

        rename = dict(RUNTIME[arch].rename)
        (ka, va), (kb, vb) = [next((k, v) for k, v in rename.items() if x in k) for x in (a, b)]
        _entry_changed(monkeypatch, arch, rename=tuple((rename | {ka: vb, kb: va}).items()))
    return variant


def _orion_norm_biases_dropped(monkeypatch):
    """Orion's LayerNorms without their biases (as if an RMSNorm-like class ran it)."""
    _wrong_plain(monkeypatch, lambda key, t: torch.zeros_like(t) if key.endswith("norm.bias") else t)


def _minicpm_multipliers_dropped(monkeypatch):
    """MiniCPM run as Granite with neutral multipliers (as Llama would run it)."""
    from exl2conv.runtime.architectures import _llama_config

    _entry_changed(monkeypatch, "MiniCPMForCausalLM", config=lambda cfg: (
        "GraniteConfig", _llama_config(cfg)[1] | dict(attention_multiplier=cfg.head_dim ** -0.5)))


def _gemma_steps_not_folded(monkeypatch):
    """Gemmoe's norms and embedding scale not folded into Mixtral's tensors."""
    _entry_changed(monkeypatch, "GemmoeForCausalLM", plain=None)


# The wrong variant each architecture's check is shown to fail on: the part of its mapping it has
# of its own (fused linears split by the converter, experts, Gemma's stored norms, Cohere's per-head
# norms, the biases of an ungated MLP in runtime order; a remote-code family's renames, config or
# folded tensors), else the packed weights' permutation.
WRONG_VARIANTS = {
    **dict.fromkeys(("Phi3ForCausalLM", "Glm4ForCausalLM", "GPT2LMHeadModel", "GPTBigCodeForCausalLM"),
                    _fused_parts_reversed),
    **dict.fromkeys(("MixtralForCausalLM", "Qwen3MoeForCausalLM", "DbrxForCausalLM"), _expert_gate_up_swapped),
    **dict.fromkeys(("GemmaForCausalLM", "Gemma2ForCausalLM", "Gemma3ForCausalLM", "Gemma3ForConditionalGeneration"),
                    _norm_offset_removed),
    "CohereForCausalLM": _head_norms_shared,
    "Starcoder2ForCausalLM": _bias_as_stored,
    "YiForCausalLM": _renames_swapped("YiForCausalLM", ".ln1.", ".ln2."),
    "InternLM2ForCausalLM": _renames_swapped("InternLM2ForCausalLM", ".w1.", ".w3."),
    "OrionForCausalLM": _orion_norm_biases_dropped,
    "MiniCPMForCausalLM": _minicpm_multipliers_dropped,
    "GemmoeForCausalLM": _gemma_steps_not_folded,
}


def _wrong_variants(arch: str):
    """(variant, the checks it must fail) pairs for ``arch``. The generate check is shown failing
    on the permutation ignored, which scrambles the head too: the architectures' own variants move
    the logits past F16_BOUND but not always a tiny model's greedy tokens (a tiny Gemma's
    embeddings, scaled by sqrt(hidden) = 8, outweigh what its layers add, so its norms' scale
    leaves the top token where it was)."""
    own = WRONG_VARIANTS.get(arch, _ignore_invperm)
    if own is _ignore_invperm:
        return [(own, ("logits", "generate"))]
    return [(own, ("logits",)), (_ignore_invperm, ("generate",))]


def check_runtime(out, arch: str, monkeypatch) -> float:
    """The EXL2 folder ``out`` (converted from an ``arch``) through the runtime in float32: its
    logits within F32_BOUND of the decoded forward's and greedy generate() following it; then each
    check failing on a wrong variant of the loader (:func:`_wrong_variants`).
    Returns the logits' largest difference relative to the largest logit."""
    ids = torch.randint(0, 258, (2, 16), generator=torch.Generator().manual_seed(0))
    reference = decoded_logits(out, ids)
    model = Exl2ForCausalLM.from_quantized(out, dtype=torch.float32)
    with torch.no_grad():
        err = float((model(ids).logits.float() - reference).abs().max() / reference.abs().max())
    check_logits(model, ids, reference, F32_BOUND)
    check_generate(model, out, ids[:1, :6])
    for variant, checks in _wrong_variants(arch):
        with monkeypatch.context() as patch:
            variant(patch)
            wrong = Exl2ForCausalLM.from_quantized(out, dtype=torch.float32)
            if "logits" in checks:
                with pytest.raises(AssertionError, match="logits off"):
                    check_logits(wrong, ids, reference, F16_BOUND)
            if "generate" in checks:
                with pytest.raises(AssertionError):
                    check_generate(wrong, out, ids[:1, :6])
    return err
