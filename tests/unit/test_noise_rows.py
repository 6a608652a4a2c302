"""Noise rows (exl2conv.noise_rows): ExLlamaV2's stand-ins for image embeddings in Qwen2-VL's
built-in calibration sets, their count, statistics and determinism; and through the job's own
code (exl2conv.calib_rows): appended to the built-in set only, saved with their statistics, and
embedded the same however the rows are chunked or reloaded."""

from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from exl2conv import calib_rows, calibration, noise_rows
from exl2conv.model import WeightIndex, load_config
from exl2conv.model import arch as arch_mod
from exl2conv.workdir import WorkFolder


def test_rows_are_appended_after_the_text_and_recognized_by_their_first_id():
    ids = torch.randint(0, 50, (3, 8), generator=torch.Generator().manual_seed(0))
    out = noise_rows.append(ids, 2)
    assert out.shape == (5, 8) and torch.equal(out[:3], ids) and (out[3:] == noise_rows.NOISE_ID).all()
    assert noise_rows.is_noise(out).tolist() == [False, False, False, True, True]


def test_statistics_are_those_of_every_element_of_the_real_rows_embeddings():
    g = torch.Generator().manual_seed(1)
    table = torch.randn(40, 16, generator=g) * 0.7 + 0.3
    ids = noise_rows.append(torch.randint(0, 50, (4, 12), generator=g), 3)  # ids >= 40 read as 0
    stats = noise_rows.statistics(ids, table, scale=2.0)
    real = ids[:4]
    x = table[torch.where(real >= 40, 0, real)].double() * 2.0
    assert stats.dtype == torch.float64
    torch.testing.assert_close(stats, torch.stack([x.mean(), x.std()]), rtol=1e-12, atol=0)


def test_noise_has_the_statistics_and_is_a_fixed_function_of_the_row():
    stats = torch.tensor([0.25, 1.5], dtype=torch.float64)
    ids = noise_rows.append(torch.zeros((2, 64), dtype=torch.long), 3)
    x = torch.full((5, 64, 32), 7.0)
    a = noise_rows.fill(x.clone(), ids, 0, stats)
    assert (a[:2] == 7.0).all()  # real rows untouched
    noise = a[2:]
    assert abs(float(noise.mean()) - 0.25) < 0.05 and abs(float(noise.std()) - 1.5) < 0.05
    assert torch.equal(noise, noise.half().float())  # float16 values, as ExLlamaV2 stores them
    assert not torch.equal(noise[0], noise[1])
    # rows 2..4 filled a chunk at a time, with their place in the set, give the same values
    b = torch.cat([noise_rows.fill(x[r:r + 1].clone(), ids[r:r + 1], r, stats) for r in range(5)])
    assert torch.equal(a, b)
    # and the row's place is what seeds it
    assert not torch.equal(noise_rows.fill(x[2:3].clone(), ids[2:3], 3, stats)[0], a[2])


class _Job(dict):
    def __init__(self, out_dir: Path, **values):
        super().__init__(values)
        self.out_dir = out_dir


def _ctx(model: Path, work: Path, cal_dataset=None):
    cfg = load_config(model)
    job = _Job(work, cal_dataset=cal_dataset, measurement_length=128, length=128, measurement_rows=4,
               dataset_rows=8)
    from exl2conv.tokenizer import load_tokenizer
    return SimpleNamespace(job=job, cfg=cfg, weights=WeightIndex(model), device=torch.device("cpu"),
                           folder=WorkFolder(job), tok=load_tokenizer(model), rep=SimpleNamespace(info=lambda s: None))


@pytest.fixture(scope="module")
def qwen2vl(tmp_path_factory):
    pytest.importorskip("transformers")
    from tests.tinymodel import make_tiny_hf
    return make_tiny_hf(tmp_path_factory.mktemp("qwen2vl") / "model", "Qwen2VLForConditionalGeneration", seed=3)


@pytest.mark.parametrize("which", ["measure", "quant"])
def test_the_builtin_set_gets_exllamav2s_count_saved_with_its_statistics(qwen2vl, tmp_path, which):
    ctx = _ctx(qwen2vl, tmp_path)
    assert arch_mod.spec_of(ctx.cfg).calib_noise == (5, 30)
    ids = calib_rows.tokenize(ctx, which)
    text = calibration.builtin_row_count(which)
    assert ids.shape == (text + (5 if which == "measure" else 30), 128)
    assert noise_rows.is_noise(ids).tolist() == [False] * text + [True] * (ids.shape[0] - text)
    assert torch.equal(ctx.folder.load_ids(which), ids)
    table = ctx.weights.get(arch_mod.embedding_tensor(ctx.cfg))
    assert torch.equal(ctx.folder.load_noise_statistics(which), noise_rows.statistics(ids, table))

    whole = calib_rows.embed_states(ctx, ctx.folder.load_ids(which), which=which)
    chunked = torch.cat([x for _, x in calib_rows.embedded_rows(ctx, ids, 7, which)])
    assert torch.equal(whole, chunked)  # a resume, or a pass that chunks otherwise, sees the same rows
    assert torch.equal(whole[:text], table[ids[:text]])
    noise = whole[text:]
    stats = ctx.folder.load_noise_statistics(which)
    # 40,960 draws or more: the sample mean within 6 standard errors, the deviation within 2 %
    assert abs(float(noise.mean()) - float(stats[0])) < 0.03 and abs(float(noise.std()) / float(stats[1]) - 1) < 0.02


def test_a_parquet_set_and_a_text_model_get_none(qwen2vl, tmp_path):
    from tests.e2e.test_architectures import write_parquet
    ctx = _ctx(qwen2vl, tmp_path / "a", cal_dataset=str(write_parquet(tmp_path / "cal.parquet")))
    (tmp_path / "a").mkdir()
    ids = calib_rows.tokenize(ctx, "quant")
    assert ids.shape == (8, 128) and not noise_rows.is_noise(ids).any()
    assert ctx.folder.load_noise_statistics("quant") is None
    assert all(spec.calib_noise == (0, 0) for name, spec in arch_mod.ARCHS.items() if not name.startswith("Qwen2"))
