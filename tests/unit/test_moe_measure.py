"""An MoE block's measurement expert by expert (exl2conv.moe_measure): each table row's errors
equal those of the whole block run with that row's candidates in every expert."""

import pytest
import torch

from exl2conv import moe_measure
from exl2conv.layers import ModuleRun, run_block
from exl2conv.measure import TABLES, reference_factors
from exl2conv.metrics import error_weight
from exl2conv.model import WeightIndex, forward, layer_linears, load_config
from exl2conv.qparams import MOE_LINEARS, distinct_columns
from tests.tinymodel import make_tiny_mixtral


@pytest.fixture(scope="module")
def block(tmp_path_factory):
    src = make_tiny_mixtral(tmp_path_factory.mktemp("moe") / "m", seed=2)
    cfg, index = load_config(src), WeightIndex(src)
    w = forward.load_layer_weights(index, cfg, 0, "mlp", "cpu")
    run = ModuleRun("mlp", w, layer_linears(cfg, 0, "mlp"), cfg, forward.RotaryCache(cfg), 2, 0)
    states = torch.randn(3, 32, cfg.hidden_size, generator=torch.Generator().manual_seed(0))
    distinct, rows = distinct_columns(TABLES["mlp"])
    columns = dict(zip(MOE_LINEARS, distinct))
    table = [dict(zip(MOE_LINEARS, row)) for row in rows]
    return run, states, columns, table, error_weight(w["post_attention_layernorm"] * 0 + 1.5)


def whole_block_errors(run, states, columns, table, weight, fisher):
    """Each row scored the plain way: every expert's candidates put in the block, the block run."""
    y_ref, factors = reference_factors(run, states, "mlp", str)
    cands = {key: moe_measure.dense_candidates(run.weights[key], spec, factors.get(spec), columns[spec.short])
             for key, spec in run.specs.items()}
    out = []
    for row in table:
        trial = {**run.weights, **{key: cands[key][row[spec.short]] for key, spec in run.specs.items()}}
        out.append(run_block(run.replace(weights=trial), states, ref=y_ref, keep_output=False,
                             err_weight=weight, fisher=fisher)[1])
    return torch.stack(out)


@pytest.mark.parametrize("with_fisher", [False, True])
def test_expert_by_expert_errors_equal_the_whole_block_run(block, with_fisher):
    run, states, columns, table, weight = block
    fisher = torch.rand(run.cfg.hidden_size, generator=torch.Generator().manual_seed(1)) if with_fisher else None
    want = whole_block_errors(run, states, columns, table, weight, fisher)
    y_ref, factors = reference_factors(run, states, "mlp", str)
    got = moe_measure.table_errors(run, states, y_ref, factors, columns, table, weight, fisher)
    assert got.shape == want.shape
    torch.testing.assert_close(got, want, rtol=2e-5, atol=0)
    assert not factors.preps and not factors.hess  # every factor let go after its last use
    # the rows differ from each other: a table scored with one row's candidates everywhere fails
    assert (want[0] - want[-1]).abs().max() > 1e-3


def test_row_groups_split_the_table_and_quantize_again(block, monkeypatch):
    run, states, columns, table, weight = block
    y_ref, factors = reference_factors(run, states, "mlp", str)
    whole = moe_measure.table_errors(run, states, y_ref, factors, columns, table, weight, None)
    row_bytes = states.numel() * 4
    monkeypatch.setattr(moe_measure, "CPU_BUFFER_BYTES", 5 * row_bytes)
    assert [len(g) for g in moe_measure.row_groups(len(table), row_bytes, torch.device("cpu"))] == [5, 5, 5, 2]
    y_ref, factors = reference_factors(run, states, "mlp", str)
    grouped = moe_measure.table_errors(run, states, y_ref, factors, columns, table, weight, None)
    torch.testing.assert_close(grouped, whole, rtol=0, atol=0)


def test_two_ranks_score_their_own_rows_and_measure_as_one_process(block, monkeypatch):
    """Each rank scores every row of the table on its own calibration rows (the Hessians summed
    over the ranks in rank order); the gathered errors are the same bits on both ranks, and
    within float noise of one process's."""
    import threading

    from exl2conv import distributed
    from tests.unit.test_distributed import run_as_ranks

    run, states, columns, table, weight = block
    seen: dict[str, tuple[int, int]] = {}
    real = moe_measure._rows_errors

    def spy(run, states, y_ref, factors, columns, rows, *rest):
        seen[threading.current_thread().name] = (states.shape[0], len(rows))
        return real(run, states, y_ref, factors, columns, rows, *rest)

    monkeypatch.setattr(moe_measure, "_rows_errors", spy)

    def errors():
        mine = distributed.active().row_range(states.shape[0])
        y_ref, factors = reference_factors(run, states[mine.start:mine.stop], "mlp", str)
        return moe_measure.table_errors(run, states[mine.start:mine.stop], y_ref, factors, columns, table, weight,
                                        None)

    one = errors()
    results = run_as_ranks(errors)
    torch.testing.assert_close(results[1], results[0], rtol=0, atol=0)
    # float32 Hessians summed from other row splits: seen within 4e-4 relative on one CPU (AVX-512
    # kernels block the sums differently); a rank scoring the wrong rows is off by far more
    torch.testing.assert_close(results[0], one, rtol=2e-3, atol=1e-6)
    assert seen == {"MainThread": (3, len(table)), "rank0": (1, len(table)), "rank1": (2, len(table))}
    assert distributed.active() is distributed.SINGLE
