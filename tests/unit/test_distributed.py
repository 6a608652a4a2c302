"""The pieces of a job on several processes: dividing work (World.owners), -d / -dr, the rank
environment, and failing fast (a rank that raises or is SIGKILLed ends every rank, with one line)."""

import json
import subprocess
import sys
import tempfile
import textwrap
import threading
import time
from pathlib import Path

import pytest
import torch

from exl2conv import distributed, launch, measure, settings
from exl2conv.errors import EXIT_ERROR, EXIT_PEER, Exl2Error
from exl2conv.follow import FollowedJob
from exl2conv.layers import ModuleRun
from exl2conv.model import WeightIndex, forward, layer_linears, load_config
from tests.tinymodel import make_tiny_llama

REPO = Path(__file__).resolve().parents[2]


# -- dividing work --------------------------------------------------------------------------------


def test_one_process_owns_everything():
    assert distributed.SINGLE.owners([3.0, 1.0, 2.0]) == [0, 0, 0]
    assert distributed.active() is distributed.SINGLE


def test_owners_balance_cost_and_follow_the_ratios():
    world = distributed.World(rank=0, size=2)
    assert world.owners([1.0] * 5) == [0, 1, 0, 1, 0]
    # a large item first: the small ones go to the other rank until it has as much
    assert world.owners([4.0, 1.0, 1.0, 1.0, 1.0, 1.0]) == [0, 1, 1, 1, 1, 0]
    fast = distributed.World(rank=1, size=2, ratios=(1.0, 3.0))
    got = fast.owners([1.0] * 8)
    assert got.count(1) == 6 and got.count(0) == 2
    three = distributed.World(rank=2, size=3)
    assert three.owners([1.0] * 7) == [0, 1, 2, 0, 1, 2, 0]


def test_owners_are_the_same_on_every_rank():
    costs = [float(c) for c in (5, 3, 3, 8, 1, 1, 2, 9, 4)]
    views = [distributed.World(rank=r, size=3, ratios=(1.0, 2.0, 1.5)).owners(costs) for r in range(3)]
    assert views[0] == views[1] == views[2]


# -- -d and -dr ----------------------------------------------------------------------------------


def test_devices_parse():
    assert launch.parse_devices("0,1", None, cuda_count=2) == ("cuda:0", "cuda:1")
    assert launch.parse_devices("cpu,cpu,cpu", None, cuda_count=0) == ("cpu",) * 3
    assert launch.parse_devices(None, "cuda:0") is None
    assert launch.plan("cpu,cpu", "1,2", None, None) == launch.Devices(("cpu", "cpu"), (1.0, 2.0))
    assert launch.plan(None, None, None, None) is None


@pytest.mark.parametrize("devices, ratios, device, says", [
    ("0,2", None, None, "CUDA device 2 is not on this machine (its CUDA devices are 0-1)"),
    ("0,0", None, None, "a CUDA device is given twice"),
    ("0,cpu", None, None, "mixes CUDA devices and cpu"),
    ("0,gpu1", None, None, "'gpu1' is not a device"),
    ("0,", None, None, "'' is not a device"),
    ("0,1", "1,1,1", None, "3 ratios for 2 ranks"),
    ("0,1", "1,-1", None, "give positive numbers"),
    ("0,1", "1,x", None, "give positive numbers"),
    ("0,1", None, "cuda:0", "-d 0,1 and --device cuda:0: give one of them"),
    (None, "1,1", None, "device ratios need -d"),
])
def test_bad_devices_are_refused_with_one_line(devices, ratios, device, says, monkeypatch):
    monkeypatch.setattr(launch, "_cuda_count", lambda: 2)
    with pytest.raises(Exl2Error) as err:
        launch.plan(devices, ratios, device, None)
    assert says in str(err.value) and "\n" not in str(err.value)


def test_rank_environment(monkeypatch):
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", settings.SUPERVISED_VARIABLE):
        monkeypatch.delenv(name, raising=False)
    assert settings.rank_environment() is None
    monkeypatch.setenv("RANK", "3")
    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("LOCAL_RANK", "1")
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    env = settings.rank_environment()
    assert (env.rank, env.world_size, env.local_rank, env.local_world_size, env.supervised) == (3, 4, 1, 2, False)
    assert env.timeout == settings.DEFAULT_DIST_TIMEOUT
    # torchrun on 2 hosts: -dr gives one ratio per rank of the job, -d this host's devices
    assert launch.plan("cpu,cpu", "1,1,2,2", None, env).ratios == (1.0, 1.0, 2.0, 2.0)
    assert launch.rank_device(launch.plan("cpu,cpu", None, None, env), None, env.local_rank).type == "cpu"
    monkeypatch.setenv("RANK", "4")
    with pytest.raises(Exl2Error, match="below the world size"):
        settings.rank_environment()


def test_a_follower_saves_nothing(tmp_path):
    FollowedJob(tmp_path, {"tool": "exl2conv", "progress": "begin"}).save()
    assert not list(tmp_path.iterdir())


# -- failing fast -------------------------------------------------------------------------------------

# Two ranks on gloo: rank 0 gathers in a loop; rank 1 does what the test asks after the first gather.
RANK_SCRIPT = textwrap.dedent("""
    import os, signal, sys, time
    from exl2conv import launch, settings
    import torch

    def body(world):
        world.all_gather(world.rank, "the first gather")
        if world.rank == 1:
            what = sys.argv[1]
            if what == "kill":
                os.kill(os.getpid(), signal.SIGKILL)
            if what == "raise":
                raise ValueError("a bug on rank 1")
            if what == "hang":
                time.sleep(60)
        for _ in range(100):
            world.all_gather(world.rank, "the loop's gather")
            time.sleep(0.5)

    env = settings.rank_environment()
    sys.exit(launch.run_rank(env, torch.device("cpu"), (1.0, 1.0), body))
""")


def start_ranks(what: str, supervised: bool, timeout: float | None = None) -> list[subprocess.Popen]:
    port = launch.free_port()
    procs = []
    for rank in range(2):
        env = settings.rank_child_environment(rank, 2, port)
        env["PYTHONPATH"] = str(REPO)
        if timeout is not None:
            env[settings.DIST_TIMEOUT_VARIABLE] = str(timeout)
        if not supervised:
            env.pop(settings.SUPERVISED_VARIABLE)
        procs.append(subprocess.Popen([sys.executable, "-c", RANK_SCRIPT, what], env=env, stdout=subprocess.PIPE,
                                      stderr=subprocess.PIPE, text=True))
    return procs


@pytest.mark.parametrize("supervised", [False, True])
def test_a_sigkilled_rank_ends_the_other_with_one_line(supervised):
    t0 = time.monotonic()
    procs = start_ranks("kill", supervised)
    outs = [p.communicate(timeout=60) for p in procs]
    assert time.monotonic() - t0 < 60
    assert procs[1].returncode == -9
    assert procs[0].returncode == EXIT_PEER
    err = outs[0][1].rstrip()
    if supervised:  # the launcher reports the killed rank; the one that lost it stays quiet
        assert err == ""
    else:
        assert len(err.splitlines()) == 1 and err.startswith(" ## Error (rank 0 of 2): lost contact with another "
                                                             "rank during the loop's gather")
    assert "Traceback" not in outs[0][1]


def test_a_rank_that_raises_says_so_in_one_line_and_the_other_follows():
    procs = start_ranks("raise", supervised=True)
    outs = [p.communicate(timeout=60) for p in procs]
    assert procs[1].returncode == EXIT_ERROR and procs[0].returncode == EXIT_PEER
    err = outs[1][1].rstrip()
    assert len(err.splitlines()) == 1, err
    assert err.startswith(" ## Error (rank 1 of 2): ValueError: a bug on rank 1 at <string>:")
    assert outs[0][1].strip() == ""


def test_a_rank_that_hangs_is_given_up_after_the_timeout():
    t0 = time.monotonic()
    procs = start_ranks("hang", supervised=False, timeout=3)
    out = procs[0].communicate(timeout=60)
    assert time.monotonic() - t0 < 30
    procs[1].kill()
    procs[1].communicate()
    assert procs[0].returncode == EXIT_PEER
    err = out[1].rstrip().splitlines()
    assert len(err) == 1 and err[0].startswith(" ## Error (rank 0 of 2): lost contact with another rank during the "
                                               "loop's gather"), err


def test_a_bad_device_is_refused_by_the_command_in_one_line(tmp_path, capsys):
    from exl2conv.cli import main

    assert main(["-i", str(tmp_path), "-o", str(tmp_path / "w"), "-d", "cpu,7"]) == EXIT_ERROR
    err = capsys.readouterr().err
    assert err.startswith(" ## Error: -d cpu,7: ") and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "w").exists()


def test_fewer_rows_than_ranks_are_refused_before_any_work(tmp_path, capsys):
    """-d with more devices than a pass has calibration rows: one line naming -d and the row
    count, before any process starts or the working folder is made (not at the measurement)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from exl2conv.calib_rows import planned_rows
    from exl2conv.cli import main

    model = make_tiny_llama(tmp_path / "m", seed=1, layers=1)
    data = tmp_path / "d.parquet"
    pq.write_table(pa.table({"text": ["some calibration text " * 40] * 8}), data)
    args = ["-i", str(model), "-o", str(tmp_path / "w"), "-c", str(data), "-ml", "128", "-l", "128", "-b", "4.0"]
    assert main([*args, "-mr", "2", "-r", "8", "-d", "cpu,cpu,cpu"]) == EXIT_ERROR
    err = capsys.readouterr().err
    assert err.strip().splitlines() == [
        "## Error: -d cpu,cpu,cpu: 3 ranks, but the measurement calibration set has 2 rows and each rank needs at "
        "least one; give more rows (-mr) or fewer devices"], err
    assert not (tmp_path / "w").exists()
    # the built-in set fixes its own counts; a pass the job will not run is not counted
    assert planned_rows({"in_dir": str(model)}, tmp_path / "w") == {"measure": (19, "builtin"),
                                                                     "quant": (115, "builtin")}
    assert planned_rows({"cal_dataset": str(data), "measurement_rows": 2, "dataset_rows": 8,
                         "output_measurement": "m.json"}, tmp_path / "w") == {"measure": (2, "dataset")}
    # a job being resumed has fixed its rows: -c need not be repeated, and more rows cannot be given
    from exl2conv.job import JOB_FILE, ROWS_USED, Stage

    (tmp_path / "w").mkdir()
    (tmp_path / "w" / JOB_FILE).write_text(json.dumps({"progress": Stage.MEASURE.value, ROWS_USED: {"measure": 2, "quant": 8}}))
    assert planned_rows({"in_dir": str(model)}, tmp_path / "w") == {"measure": (2, "job"), "quant": (8, "job")}
    with pytest.raises(Exl2Error, match="has 2 rows and each rank needs at least one; resume it on at most 2 devices"):
        launch.check_rows(3, "-d cpu,cpu,cpu", planned_rows({"in_dir": str(model)}, tmp_path / "w"))


def test_the_asymmetric_mode_with_several_ranks_is_refused_before_any_work(tmp_path, capsys, monkeypatch):
    """EXL2CONV_ASYMMETRIC=1 runs in one process only: with -d of two devices, one line at the
    command's start, no working folder made (not a refusal at the quantization pass)."""
    from exl2conv.cli import main

    model = make_tiny_llama(tmp_path / "m", seed=1, layers=1)
    monkeypatch.setenv("EXL2CONV_ASYMMETRIC", "1")
    assert main(["-i", str(model), "-o", str(tmp_path / "w"), "-d", "cpu,cpu"]) == EXIT_ERROR
    err = capsys.readouterr().err
    assert err.strip().splitlines() == ["## Error: EXL2CONV_ASYMMETRIC=1 quantizes in one process only, and -d / "
                                        "WORLD_SIZE gives 2: leave it unset, or run on one device"], err
    assert not (tmp_path / "w").exists()


def test_the_launcher_names_a_killed_rank_and_returns_non_zero(capsys):
    class Done:
        def __init__(self, code):
            self.returncode = code

        def poll(self):
            return self.returncode

    devs = launch.Devices(("cpu", "cpu", "cpu"), (1.0,) * 3)
    assert launch._supervise([Done(EXIT_PEER), Done(-9), Done(EXIT_PEER)], devs) == EXIT_ERROR
    err = capsys.readouterr().err.rstrip()
    assert err.splitlines() == ["", " ## Error: rank 1 (cpu) was killed by SIGKILL; the other ranks were stopped and "
                                "the job's last checkpoint is kept: run the same command to resume"]
    # a rank that said why itself: its status, no second line
    assert launch._supervise([Done(EXIT_PEER), Done(0), Done(130)], devs) == 130
    assert capsys.readouterr().err == ""
    assert launch._supervise([Done(0)] * 3, devs) == 0
    # another rank's own line is shown from its kept stderr, unless rank 0 said its own
    kept = [None, tempfile.TemporaryFile(mode="w+"), tempfile.TemporaryFile(mode="w+")]
    kept[1].write(" ## Error (rank 1 of 3): boom\n")
    kept[1].flush()
    assert launch._supervise([Done(EXIT_PEER), Done(1), Done(EXIT_PEER)], devs, kept) == 1
    assert capsys.readouterr().err == "\n ## Error (rank 1 of 3): boom\n"
    assert launch._supervise([Done(1), Done(1), Done(EXIT_PEER)], devs, kept) == 1
    assert capsys.readouterr().err == ""



# -- the split, two ranks as two threads ----------------------------------------------------------


class ThreadWorld(distributed.World):
    """A rank whose collectives meet the other ranks' threads in this process: the tensor
    collectives (:meth:`World.gather_tensors`, :meth:`World.sum_in_order`, :meth:`World.share`)
    run their own code on top of this gather."""

    def __init__(self, rank: int, size: int, slots: list, barrier: threading.Barrier, ratios=None):
        super().__init__(rank, size, ratios=tuple(ratios or (1.0,) * size))
        self.slots, self.sync = slots, barrier

    def all_gather(self, obj, what):
        self.slots[self.rank] = obj
        self.sync.wait()
        out = list(self.slots)
        self.sync.wait()  # every rank has read the slots before the next gather fills them
        return out

    def _gather_equal(self, x, what, to_main=False):
        parts = [p.clone() for p in self.all_gather(x.clone(), what)]
        return None if to_main and not self.is_main else parts

    def broadcast(self, obj, what):
        return self.all_gather(obj, what)[0]

    def _broadcast_bytes(self, buf, src, what):
        sent = self.all_gather(buf.clone() if self.rank == src else None, what)[src]
        if self.rank != src:
            buf.copy_(sent)


def run_as_ranks(fn, size: int = 2, ratios=None) -> dict:
    """``fn()`` on ``size`` ranks, each a thread meeting the others in :class:`ThreadWorld`'s
    gathers (``distributed.active()`` is the rank's world); returns each rank's result."""
    slots, barrier, results = [None] * size, threading.Barrier(size, timeout=60), {}

    def rank(r):
        with distributed.use(ThreadWorld(r, size, slots, barrier, ratios)):
            results[r] = fn()

    threads = [threading.Thread(target=rank, args=(r,), name=f"rank{r}") for r in range(size)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    return results


def test_row_ranges_are_contiguous_cover_every_row_and_follow_the_ratios():
    def ranges(count, size, ratios=None):
        return [distributed.World(r, size, ratios=ratios or (1.0,) * size).row_range(count) for r in range(size)]

    assert distributed.SINGLE.row_range(5) == range(5)
    assert ranges(4, 2) == [range(0, 2), range(2, 4)]
    assert ranges(4, 3, (1.0, 2.0, 1.0)) == [range(0, 1), range(1, 3), range(3, 4)]
    assert [len(r) for r in ranges(101, 2, (1.0, 3.0))] == [26, 75]
    for count, size in ((7, 3), (3, 3), (100, 8)):
        got = ranges(count, size)
        assert got[0].start == 0 and got[-1].stop == count and all(len(r) >= 1 for r in got)
        assert all(a.stop == b.start for a, b in zip(got, got[1:]))
    with pytest.raises(Exl2Error, match="2 calibration rows for 3 ranks"):
        ranges(2, 3)


def test_tensor_gathers_and_sums_in_rank_order():
    def work():
        world = distributed.active()
        mine = torch.full((world.rank + 1, 3), float(world.rank))
        rows = world.gather_rows(mine, "rows")
        to_main = world.gather_rows(mine, "rows", to_main=True, step_bytes=12)  # a row (3 floats) at a time
        # 1 + 2^-24 + 2^-24 in float32: rank order decides the bits; a sliced sum gives the same
        total = torch.tensor([[1.0, 2.0 ** -24][world.rank]] * 4, dtype=torch.float32).view(4, 1)
        world.sum_in_order(total, "sum", chunk_bytes=4)
        return rows, to_main, total

    out = run_as_ranks(work)
    for r in range(2):
        assert out[r][0].tolist() == [[0.0] * 3, [1.0] * 3, [1.0] * 3]
        assert torch.equal(out[r][2], torch.full((4, 1), 1.0 + 2.0 ** -24))
    assert torch.equal(out[0][1], out[0][0]) and out[1][1] is None


def test_items_of_tensors_are_shared_in_rank_order_through_byte_buffers():
    """World.share: every rank's items (tensors of any dtype and shape, and plain values), in rank
    order and bit for bit, a rank with none included, in slices of a few bytes through the wire."""
    g = torch.Generator().manual_seed(0)
    items = {0: [[torch.randn(3, 5, generator=g).half(), "q", torch.tensor(7, dtype=torch.int64)],
                 [torch.rand(4, generator=g) > 0.5, torch.empty(0, 2), torch.randint(-9, 9, (3,), dtype=torch.int16)]],
             1: [],
             2: [[torch.randn(2, 2, 2, generator=g), None, torch.arange(5, dtype=torch.uint8)]]}

    def shared():
        world = distributed.active()
        return world.share(items[world.rank], "items", torch.device("cpu"), step_bytes=24)

    results = run_as_ranks(shared, size=3)
    assert sorted(results) == [0, 1, 2]  # no rank failed
    for got in results.values():
        assert len(got) == 3 and [len(r) for r in got] == [2, 0, 1]
        for r in range(3):
            for want_item, got_item in zip(items[r], got[r]):
                for want, x in zip(want_item, got_item):
                    if isinstance(want, torch.Tensor):
                        assert x.dtype == want.dtype and x.shape == want.shape and torch.equal(x, want)
                    else:
                        assert x == want


def test_hessians_and_expert_coverage_are_summed_over_the_ranks():
    from exl2conv import shared_rows
    from exl2conv.gptq import Hessian
    from exl2conv.moe import ExpertCoverage

    x = torch.randn(3, 4, 8, generator=torch.Generator().manual_seed(0))
    counts = torch.tensor([[4, 0], [1, 3], [2, 2]])

    def reduced():
        rank = distributed.active().rank
        mine = slice(0, 1) if rank == 0 else slice(1, 3)
        h, cov = Hessian(8), ExpertCoverage("moe", 2, 4)
        h.add_rows(x[mine])
        cov.add_rows(counts[mine])
        shared_rows.reduce_hessians(distributed.active(), {"x": h}, "a module")
        shared_rows.reduce_coverage(distributed.active(), cov, "a module")
        return h, cov

    one = Hessian(8)
    one.add_rows(x)
    ranks = run_as_ranks(reduced)
    for h, cov in ranks.values():
        assert h.rows == 3 and torch.equal(h.h, ranks[0][0].h)  # every rank the same bits
        torch.testing.assert_close(h.h, one.h, rtol=1e-6, atol=1e-6)  # one process's, but for the float order
        assert cov.rows == 3 and cov.tokens.tolist() == [7, 5]


def test_each_rank_holds_only_its_share_of_the_states(tmp_path):
    """A pass's states, embedded from the ids or read from a checkpoint: each rank gets only its
    rows (a contiguous slice, weighed by -dr), and the slices in rank order are one process's."""
    from exl2conv import noise_rows, pipeline
    from exl2conv.job import Job, new_job_data
    from exl2conv.model import arch
    from exl2conv.report import Reporter

    src = make_tiny_llama(tmp_path / "m", seed=1, hidden=64, intermediate=96, layers=1)
    cfg, index = load_config(src), WeightIndex(src)
    (tmp_path / "w").mkdir()
    job = Job(tmp_path / "w", new_job_data({"in_dir": str(src)}))
    ctx = pipeline.Context(job, cfg, index, torch.device("cpu"), Reporter(quiet=True))
    # the last 2 rows are noise rows (Qwen2-VL's), seeded by their row in the set, not in a rank's share
    ids = noise_rows.append(torch.randint(0, cfg.vocab_size, (3, 16), generator=torch.Generator().manual_seed(0)), 2)
    table = index.get(arch.embedding_tensor(cfg), dtype=torch.float32)
    ctx.folder.save_ids("measure", ids, noise_rows.statistics(ids, table, cfg.embed_scale))
    ctx.folder.save_checkpoint("measure", 0, None, last_module_idx=0)
    whole = pipeline.load_checkpoint(ctx, "measure")[1]
    for ratios, counts in (((1.0, 1.0), [3, 2]), ((1.0, 3.0), [2, 3])):
        embedded = run_as_ranks(lambda: pipeline.load_checkpoint(ctx, "measure")[1], ratios=ratios)
        assert [embedded[r].shape[0] for r in range(2)] == counts
        assert torch.equal(torch.cat([embedded[0], embedded[1]]), whole)
    ctx.folder.save_checkpoint("measure", 2, whole * 2, last_module_idx=2)
    loaded = run_as_ranks(lambda: pipeline.load_checkpoint(ctx, "measure"))
    assert [(loaded[r][0], loaded[r][1].shape[0]) for r in range(2)] == [(2, 3), (2, 2)]
    assert torch.equal(torch.cat([loaded[0][1], loaded[1][1]]), whole * 2)


@pytest.mark.parametrize("part", ["attn", "mlp"])
def test_two_ranks_share_the_rows_and_candidates_and_measure_as_one_process(tmp_path, monkeypatch, part):
    """Each rank runs its own calibration rows (the Hessians summed in rank order) and makes its
    share of the candidates; both end with the same entries, within float noise of one process's."""
    src = make_tiny_llama(tmp_path / "m", seed=1, hidden=64, intermediate=96, layers=1)
    cfg, index = load_config(src), WeightIndex(src)
    w = forward.load_layer_weights(index, cfg, 0, part, "cpu")
    specs = layer_linears(cfg, 0, part)
    states = torch.randn(4, 16, cfg.hidden_size, generator=torch.Generator().manual_seed(0))
    made, seen = {}, {}
    real_make, real_pass = measure.quantized_candidates, measure.run_block

    def spy_make(*args, **kwargs):
        out = real_make(*args, **kwargs)
        made[threading.current_thread().name] = made.get(threading.current_thread().name, 0) + len(out)
        return out

    def spy_pass(run, states, *args, **kwargs):
        seen[threading.current_thread().name] = states.shape[0]
        return real_pass(run, states, *args, **kwargs)

    monkeypatch.setattr(measure, "quantized_candidates", spy_make)
    monkeypatch.setattr(measure, "run_block", spy_pass)

    def measure_as(world):
        with distributed.use(world):
            rows = world.row_range(states.shape[0])
            run = ModuleRun(part, w, specs, cfg, forward.RotaryCache(cfg), 2, 0)
            return measure.measure_module(run, states[rows.start:rows.stop])

    one = measure_as(distributed.SINGLE)
    total_made = made.pop("MainThread")
    results = run_as_ranks(lambda: measure_as(distributed.active()))
    assert results[0][0] == results[1][0]  # every rank the same entries
    worst = max(abs(a["accuracy"] - b["accuracy"]) for a, b in zip(results[0][0], one[0]))
    assert worst < 1e-4, worst  # a flipped GPTQ rounding moves an accuracy by ~1e-5 (docs/distributed.md)
    assert [e["total_bits"] for e in results[0][0]] == [e["total_bits"] for e in one[0]]
    torch.testing.assert_close(torch.cat([results[0][1], results[1][1]]), one[1], rtol=1e-5, atol=1e-6)
    # each rank ran its own rows and made a share of the candidates
    assert seen == {"MainThread": 4, "rank0": 2, "rank1": 2}
    assert sum(made.values()) == total_made and min(made.values()) >= total_made // 3


@pytest.mark.parametrize("part", ["attn", "mlp"])
def test_two_ranks_share_a_modules_rows_and_linears_and_quantize_as_one_process(tmp_path, monkeypatch, part):
    from exl2conv import quantize

    src = make_tiny_llama(tmp_path / "m", seed=1, hidden=64, intermediate=96, layers=1)
    cfg, index = load_config(src), WeightIndex(src)
    w = forward.load_layer_weights(index, cfg, 0, part, "cpu")
    specs = layer_linears(cfg, 0, part)
    states = torch.randn(4, 16, cfg.hidden_size, generator=torch.Generator().manual_seed(0))
    run = ModuleRun(part, w, specs, cfg, forward.RotaryCache(cfg), 2, 0)
    entry = measure.measure_module(run, states)[0][3]
    made, tweaked_on = {}, []
    real, real_tweak = quantize.quantize_linear, quantize.tweak.tweak_norm

    def spy(*args, **kwargs):
        made.setdefault(threading.current_thread().name, []).append(args[2].name)
        return real(*args, **kwargs)

    def spy_tweak(*args, **kwargs):
        tweaked_on.append(threading.current_thread().name)
        return real_tweak(*args, **kwargs)

    monkeypatch.setattr(quantize, "quantize_linear", spy)
    monkeypatch.setattr(quantize.tweak, "tweak_norm", spy_tweak)

    def quantized():
        saved, rows = {}, distributed.active().row_range(states.shape[0])
        # norm tweaking's target on the first 3 rows: rank 0 holds 2 of them, rank 1 the third
        target = states[:3] * 1.01
        y, rfn, reports, tweaked = quantize.quantize_module(run, states[rows.start:rows.stop].clone(), entry,
                                                            lambda name, t: saved.setdefault(name, t), target=target)
        return y, rfn, [r.__dict__ for r in reports], saved, tweaked.weight

    one = quantized()
    names = made.pop("MainThread")
    ranks = run_as_ranks(quantized)
    for r in range(2):  # every rank the same bits
        assert ranks[r][1:3] == ranks[0][1:3] and torch.equal(ranks[r][4], ranks[0][4])
        assert all(torch.equal(ranks[r][3][n][k], ranks[0][3][n][k]) for n in ranks[0][3] for k in ranks[0][3][n])
    torch.testing.assert_close(torch.cat([ranks[0][0], ranks[1][0]]), one[0], rtol=1e-3, atol=1e-4)
    assert abs(ranks[0][1] - one[1]) < 1e-4 * one[1] and list(ranks[0][3]) == list(one[3])
    torch.testing.assert_close(ranks[0][4], one[4], rtol=1e-4, atol=1e-6)
    assert sorted(made) == ["rank0", "rank1"]
    assert sorted(made["rank0"] + made["rank1"]) == sorted(names)
    assert tweaked_on == ["MainThread", "rank0"]  # rank 0 alone tweaks; rank 1 gets its norm
