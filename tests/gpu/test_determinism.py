"""The same command twice on one GPU gives the same bytes (run on the device machine; skipped
elsewhere). The sensitivity stage and norm tweaking run backward passes through attention, whose
float32 memory-efficient CUDA kernel sums gradients with atomics; they use a blocked float32 attention
of our own (or the math kernels), or
with EXL2CONV_HALF_ATTENTION=1 float16 causal attention on the flash kernels' deterministic
backward (:func:`exl2conv.layers.grad_pass`)."""

import hashlib

import pytest
import torch

from exl2conv.cli import main
from tests.tinymodel import make_tiny_llama

pytestmark = pytest.mark.gpu


def digest(folder) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.glob("*")) if p.suffix in (".safetensors", ".json")}


def test_two_runs_give_the_same_bytes_on_cuda(tmp_path):
    src = make_tiny_llama(tmp_path / "m", seed=4, hidden=256, intermediate=512, layers=2, heads=4, kv_heads=2)
    outs = []
    for run in ("a", "b"):
        out = tmp_path / run / "out"
        rc = main(["-i", str(src), "-o", str(tmp_path / run / "w"), "-cf", str(out), "-b", "4.0",
                   "-l", "256", "-ml", "256", "--device", "cuda"])
        assert rc == 0
        outs.append((digest(out), (tmp_path / run / "w" / "measurement.json").read_text()))
    assert outs[0][0] == outs[1][0]
    assert outs[0][1] == outs[1][1]


def test_states_in_host_memory_give_the_same_bytes(tmp_path, monkeypatch, capsys):
    """EXL2CONV_STATES=host: both passes keep their states in pinned host memory (the measurement
    also its reference outputs, Hessians waiting their turn and its candidates' codes) and copy
    each chunk to the GPU; the arithmetic is the same, so are the measurement and the output files."""
    from exl2conv.pipeline import STATES_ENV

    src = make_tiny_llama(tmp_path / "m", seed=4, hidden=256, intermediate=512, layers=2, heads=4, kv_heads=2)
    outs = []
    for mode in ("gpu", "host"):
        monkeypatch.setenv(STATES_ENV, mode)
        out = tmp_path / mode / "out"
        rc = main(["-i", str(src), "-o", str(tmp_path / mode / "w"), "-cf", str(out), "-b", "4.0",
                   "-l", "256", "-ml", "256", "--device", "cuda"])
        assert rc == 0
        outs.append((digest(out), (tmp_path / mode / "w" / "measurement.json").read_text()))
        cap = capsys.readouterr()
        printed = cap.out + cap.err
        assert ("kept in host memory" in printed) == (mode == "host")
    assert outs[0] == outs[1]


def test_attention_backward_repeats_bit_for_bit():
    from exl2conv.layers import grad_pass

    g = torch.Generator(device="cuda").manual_seed(0)
    q, k, v = (torch.randn(4, 8, 1024, 64, device="cuda", generator=g, requires_grad=True) for _ in range(3))
    grads = []
    for _ in range(3):
        for t in (q, k, v):
            t.grad = None
        with torch.enable_grad(), grad_pass(q.device):
            torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True).square().sum().backward()
        grads.append(torch.cat([q.grad.flatten(), k.grad.flatten(), v.grad.flatten()]))
    assert all(torch.equal(grads[0], x) for x in grads[1:])


def _attention_grads(half: bool, monkeypatch, repeats: int = 3):
    """Input gradients of one GQA attention module under grad_pass, ``repeats`` times."""
    from exl2conv.layers import grad_pass
    from exl2conv.model import forward
    from exl2conv.model.config import load_config
    from exl2conv.model.weights import WeightIndex

    monkeypatch.setenv("EXL2CONV_HALF_ATTENTION", "1" if half else "0")
    import tempfile
    from pathlib import Path
    with tempfile.TemporaryDirectory() as d:
        src = make_tiny_llama(Path(d), seed=2, hidden=256, intermediate=512, layers=1, heads=8, kv_heads=2)
        cfg = load_config(src)
        w = forward.load_layer_weights(WeightIndex(src), cfg, 0, "attn", "cuda")
    rope = forward.RotaryCache(cfg)
    g = torch.Generator(device="cuda").manual_seed(0)
    x0 = torch.randn(4, 1024, 256, device="cuda", generator=g)
    target = torch.randn(4, 1024, 256, device="cuda", generator=g)
    grads = []
    for _ in range(repeats):
        x = x0.clone().requires_grad_()
        with torch.enable_grad(), grad_pass(x.device):
            y, _ = forward.attention(x, w, cfg, rope, layer=0)
            ((y - target).square().sum() * 1e-9).backward()  # small: the half path scales it
        grads.append(x.grad)
    return grads


def test_half_attention_backward_repeats_and_matches_float32(monkeypatch):
    half = _attention_grads(True, monkeypatch)
    assert all(torch.equal(half[0], x) for x in half[1:])
    full = _attention_grads(False, monkeypatch, repeats=1)[0]
    rel = float((half[0] - full).norm() / full.norm())
    assert rel < 5e-3, rel


def test_blocked_attention_repeats_and_matches_the_math_kernels(monkeypatch):
    """The default float32 attention of the grad passes (attention_kernels.BlockedAttention): it
    runs, its input gradients repeat bit for bit, and they match PyTorch's math kernels'."""
    from exl2conv.model import attention_kernels

    calls = []
    apply = attention_kernels.BlockedAttention.apply
    monkeypatch.setattr(attention_kernels.BlockedAttention, "apply", lambda *a: calls.append(1) or apply(*a))
    monkeypatch.setattr(attention_kernels, "BLOCK", 384)  # 1024 = 384 + 384 + 256: a partial last block
    blocked = _attention_grads(False, monkeypatch)
    assert calls
    assert all(torch.equal(blocked[0], x) for x in blocked[1:])
    calls.clear()
    monkeypatch.setenv("EXL2CONV_GRAD_ATTENTION", "math")
    math = _attention_grads(False, monkeypatch, repeats=1)[0]
    assert not calls
    rel = float((blocked[0] - math).norm() / math.norm())
    assert rel < 2e-3, rel
