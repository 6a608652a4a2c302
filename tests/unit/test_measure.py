"""The measurement's bookkeeping of its candidates' codes (exl2conv.measure.codes_sizes) and the
host buffer they go to on a GPU (exl2conv.memory.HostArena, here without page-locking)."""

import pytest
import torch

from exl2conv import measure
from exl2conv.memory import HostArena
from exl2conv.layers import ModuleRun
from exl2conv.model import WeightIndex, forward, layer_linears, load_config
from tests.tinymodel import make_tiny_llama


@pytest.mark.parametrize("part", ["attn", "mlp"])
def test_codes_sizes_are_the_codes_measure_module_makes(tmp_path, monkeypatch, part):
    src = make_tiny_llama(tmp_path / "m", seed=1, hidden=64, intermediate=96, layers=1)
    cfg, index = load_config(src), WeightIndex(src)
    w = forward.load_layer_weights(index, cfg, 0, part, "cpu")
    specs = layer_linears(cfg, 0, part)
    made = []
    real = measure.quantized_candidates

    def spy(*args, **kwargs):
        out = real(*args, **kwargs)
        made.extend(out)
        return out

    monkeypatch.setattr(measure, "quantized_candidates", spy)
    states = torch.randn(2, 16, cfg.hidden_size, generator=torch.Generator().manual_seed(0))
    entries, _, _ = measure.measure_module(ModuleRun(part, w, specs, cfg, forward.RotaryCache(cfg), 2, 0), states)
    assert len(entries) == len(measure.TABLES[part])
    sizes = [c.codes.numel() * c.codes.element_size() for c in made]
    assert sizes == measure.codes_sizes(part, specs)
    if part == "attn":
        assert len(set(sizes)) > 1  # k/v narrower than q/o (grouped-query attention)


def test_host_arena_hands_out_consecutive_aligned_copies_and_reuses_them_after_a_reset():
    g = torch.Generator().manual_seed(0)
    items = [torch.randint(0, 255, shape, generator=g, dtype=torch.uint8) for shape in ((7, 33), (64, 8), (5, 5))]
    sizes = [t.numel() for t in items]
    arena = HostArena(HostArena.size_for(sizes), pin=False)
    assert arena.buf.numel() == 512 + 512 + 512
    copies = [arena.copy_of(t) for t in items]
    base = arena.buf.data_ptr()
    assert [c.data_ptr() - base for c in copies] == [0, 512, 1024]
    for c, t in zip(copies, items):
        assert c.shape == t.shape and torch.equal(c, t)
    arena.reset()
    first = arena.copy_of(items[2])
    assert first.data_ptr() == base and torch.equal(first, items[2])
    assert torch.equal(copies[0].flatten()[:25], items[2].flatten())  # the same bytes, reused


def test_host_arena_past_its_end_gives_a_block_of_its_own():
    arena = HostArena(HostArena.size_for([100]), pin=False)
    a = arena.copy_of(torch.full((100,), 3, dtype=torch.uint8))
    b = arena.copy_of(torch.full((10, 10), 4, dtype=torch.uint8))  # no room left
    assert a.data_ptr() == arena.buf.data_ptr()
    assert not (arena.buf.data_ptr() <= b.data_ptr() < arena.buf.data_ptr() + arena.buf.numel())
    assert torch.equal(a, torch.full((100,), 3, dtype=torch.uint8)) and torch.equal(b, torch.full((10, 10), 4, dtype=torch.uint8))
    arena.close()
    assert arena.buf.numel() == 0 and torch.equal(a, torch.full((100,), 3, dtype=torch.uint8))
