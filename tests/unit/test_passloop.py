"""exl2conv.passloop: where a pass checkpoints, and what a stop inside or between modules saves."""

from types import SimpleNamespace

import pytest

from exl2conv import stop
from exl2conv.errors import Interrupted
from exl2conv.layers import Module
from exl2conv.passloop import run_modules
from exl2conv.report import Reporter


def _ctx(interval: float):
    job = {"checkpoint_interval": interval, "checkpoint": None}
    return SimpleNamespace(job=job, rep=Reporter(quiet=True), out_dir="WORK")


def _mods(n: int) -> list[Module]:
    return [Module(index=i, kind="attn", key=f"m{i}", layer=i) for i in range(n)]


@pytest.fixture(autouse=True)
def _no_stop_left():
    stop.reset()
    yield
    stop.reset()


def _run(ctx, mods, start, step):
    saved = []

    def checkpoint(index, states):
        saved.append((index, states))
        ctx.job["checkpoint"] = {"module": index}

    return saved, lambda: run_modules(ctx, "Test", mods, start, start, step, checkpoint)


def test_checkpoints_after_the_last_module_only_when_none_is_due():
    ctx = _ctx(interval=1e9)
    saved, go = _run(ctx, _mods(5), 1, lambda mod, states, bar: states + 1)
    go()
    assert saved == [(4, 4)]  # modules 2..4 ran on states 1 -> 4


def test_an_interval_of_zero_checkpoints_after_every_module():
    ctx = _ctx(interval=0)
    saved, go = _run(ctx, _mods(4), 0, lambda mod, states, bar: states + 1)
    go()
    assert saved == [(1, 1), (2, 2), (3, 3)]


def test_a_stop_inside_a_module_saves_its_inputs_as_the_state_before_it():
    ctx = _ctx(interval=1e9)

    def step(mod, states, bar):
        if mod.index == 3:
            raise stop.StopRequested()
        return states + 1

    saved, go = _run(ctx, _mods(6), 0, step)
    with pytest.raises(Interrupted, match="stopped in m3"):
        go()
    assert saved == [(2, 2)]


def test_a_stop_between_modules_lets_the_module_finish_and_saves_after_it():
    ctx = _ctx(interval=1e9)

    def step(mod, states, bar):
        if mod.index == 2:
            stop.request()
        return states + 1

    saved, go = _run(ctx, _mods(6), 0, step)
    with pytest.raises(Interrupted, match="stopped after m2"):
        go()
    assert saved == [(2, 2)]
