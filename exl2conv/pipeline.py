"""The conversion job: validate everything, then run the stages in order, resumably.

Stages, as ExLlamaV2's conversion/convert_exl2.py names them in its job file: begin ->
initial_embeddings -> sensitivity -> measure_quant -> optimize -> tokens_cal -> embeddings -> quant
-> compile -> finished (sensitivity is ours: exl2conv.sensitivity). Each stage is a function of
the context that ends by advancing the job; the job file is saved atomically at every transition and
at every checkpoint, so an interruption at any instant resumes from the last saved state.
"""

from __future__ import annotations

import signal
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from exl2conv import (allocation, atomic, calib_rows, calibration, compile as compile_mod, distributed, faults,
                      noise_rows, sensitivity, settings, stop, tweak)
from exl2conv.errors import Exl2Error, Interrupted
from exl2conv.head import quantize_head
from exl2conv.job import JOB_FILE, ROWS_USED, STAGE_ORDER, Job, Stage
from exl2conv.layers import Module, ModuleRun, module_linears, module_list, run_block
from exl2conv.memory import release_cached
from exl2conv.metrics import error_weight
from exl2conv.measure import check_finite, codes_arena, measure_module
from exl2conv.moe import report_coverage
from exl2conv.model import arch, exllamav2_config, forward
from exl2conv.model.weights import WeightIndex
from exl2conv.passloop import run_modules
from exl2conv.quantize import quantize_module
from exl2conv.report import Reporter, Summary, print_plan, summarize
from exl2conv.tokenizer import load_tokenizer
from exl2conv.validate import (check_model_unchanged, check_paths, check_positions, check_shard_size, load_model,
                               model_fingerprint_of, pick_device)
from exl2conv.workdir import (MEASUREMENT, OUT_TENSOR, WorkFolder, check_measurement_fingerprint, check_work_dir,
                              load_measurement_file, open_job)
from exl2conv.worklock import WorkLock

# -- context ------------------------------------------------------------------------------------


CHUNK_BYTES = {"cuda": 1 << 30, "cpu": 256 << 20}


@dataclass
class Context:
    job: Job
    cfg: Any
    weights: WeightIndex
    device: torch.device
    rep: Reporter
    _tok: Any = None

    @property
    def out_dir(self) -> Path:
        return self.job.out_dir

    @property
    def folder(self) -> WorkFolder:
        return WorkFolder(self.job)

    @property
    def tok(self):
        if self._tok is None:
            self._tok = load_tokenizer(Path(self.job["in_dir"]))
        return self._tok

    @property
    def modules(self) -> list[Module]:
        # keys carry the architecture's prefix (Gemma3ForConditionalGeneration: "language_model."),
        # as ExLlamaV2's measurement.json does (conversion/measure.py, measure_quant)
        spec = arch.spec_of(self.cfg)

        def key(name: str) -> str:
            return arch.output_name(self.cfg, spec.prefix + name)
        return module_list(self.cfg.num_layers, layers_prefix=key(spec.layers), norm_key=key(spec.final_norm),
                           head_key=key(spec.head), embed_key=key(spec.embed), moe=spec.moe,
                           positions_key=key(spec.positions) if spec.positions else None, parallel=spec.parallel)

    def chunk(self, length: int) -> int:
        """Calibration rows per forward call: a quarter of :data:`CHUNK_BYTES` (1 GiB on a GPU,
        where fewer, larger calls launch fewer kernels; 256 MiB on a CPU) for the widest float32
        intermediate (an MoE block holds each token's activations once per routed expert)."""
        mlp_width = self.cfg.intermediate_size * max(1, self.cfg.num_experts_per_tok)
        width = max(self.cfg.hidden_size, mlp_width, self.cfg.num_heads * self.cfg.head_dim)
        budget = CHUNK_BYTES["cuda" if self.device.type == "cuda" else "cpu"]
        return max(1, int(budget // (length * width * 4 * 4)))

    def layer_weights(self, mod: Module) -> tuple[dict, dict]:
        """A module's weights and its linears' specs. On a GPU the linears' weights (an MoE
        block's experts too: 1.2 GiB a Qwen3-30B-A3B layer instead of 2.4) stay in their 2-byte
        source dtype: GPTQ and the forwards widen them exactly where they need float32."""
        compact = self.device.type == "cuda"
        w = forward.load_layer_weights(self.weights, self.cfg, mod.layer, mod.kind, self.device, compact)
        return w, module_linears(self.cfg, mod)

    def next_norm_weight(self, mod: Module) -> torch.Tensor:
        """Weight of the RMSNorm that next reads the residual stream after ``mod``."""
        if mod.kind == "attn":
            name = arch.unquantized_tensors(self.cfg, mod.layer)[1]
        elif mod.layer + 1 < self.cfg.num_layers:
            name = arch.unquantized_tensors(self.cfg, mod.layer + 1)[0]
        else:
            name = arch.final_norm_tensor(self.cfg)
        return error_weight(forward.load_norm(self.weights, self.cfg, name, self.device))

    def numel_decoder(self) -> int:
        return allocation.decoder_numel(self.cfg)


# -- checkpoints ------------------------------------------------------------------------------------


def load_checkpoint(ctx: Context, pass_: str, home: torch.device | None = None) -> tuple[int, torch.Tensor | None]:
    """The module index and the calibration states of the job's checkpoint of ``pass_``, on
    ``home`` (default: the compute device; pinned when the CPU stands in for a GPU); the
    embeddings (module 0) are recomputed from the saved token ids, not stored. With several
    ranks, this rank's rows only (:meth:`World.row_range`): it never holds the others'."""
    ids = ctx.folder.load_ids(pass_)
    world = distributed.active()
    rows = world.row_range(ids.shape[0]) if world.shared else None
    index, states = ctx.folder.load_checkpoint(pass_, ctx.device, home, rows)
    if states is None and index == 0:
        rows = rows or range(ids.shape[0])
        states = calib_rows.embed_states(ctx, ids[rows.start:rows.stop], home, pass_, rows.start)
    return index, states


# A checkpoint's rows go through the process group (a GPU's memory under NCCL) this much of each
# rank's at a time: the states may be in host memory because they do not fit the GPU.
GATHER_BYTES = 256 << 20


def save_states(ctx: Context, pass_: str, index: int, states: torch.Tensor | None, **fields) -> None:
    """The checkpoint of ``pass_`` after module ``index``, written by rank 0 alone. With several
    ranks, every rank calls it: rank 0 gathers the others' rows into its host memory (through the
    process group :data:`GATHER_BYTES` of each rank's rows at a time) to write the whole set, as one
    process writes it."""
    world = distributed.active()
    if world.shared and states is not None:
        states = world.gather_rows(states.cpu(), f"the checkpoint after module {index}", to_main=True,
                                   step_bytes=GATHER_BYTES)
    if world.is_main:
        ctx.folder.save_checkpoint(pass_, index, states, **fields)


# -- stages ------------------------------------------------------------------------------------------


def tokenize_stage(ctx: Context, which: str, next_stage: Stage) -> None:
    """Tokenize one calibration set and advance. The rows it made go into the job's
    :data:`ROWS_USED`, never into -mr / -r: the built-in set fixes its own count (ExLlamaV2
    overwrites its job's -mr / -r with it), and a resume must find the command's values there."""
    ids = calib_rows.tokenize(ctx, which)
    used = {**(ctx.job[ROWS_USED] or {}), which: int(ids.shape[0])}
    ctx.job.advance(next_stage, cal_filename=str(ctx.folder.ids_file(which)), **{ROWS_USED: used})


def stage_begin(ctx: Context) -> None:
    job = ctx.job
    if job["reuse_measurement"]:
        ctx.rep.info("Reusing measurement")
        job.advance(Stage.OPTIMIZE)
        return
    ctx.rep.info("Tokenizing samples (measurement)...")
    ctx.rep.status("Tokenizing (1)", 0, 1)
    tokenize_stage(ctx, "measure", Stage.INITIAL_EMBEDDINGS)


STATES_ENV = "EXL2CONV_STATES"  # "gpu", "host" or "auto" (the default)
# auto: the states stay on the GPU up to this size. A small model's cost little there and spare
# the copies; a large model's would be most of the pass's peak (Llama-2-7B's 100 x 2048 rows take
# 3.1 GiB, its largest module works in under 2; the measurement's states and reference outputs
# 1.2 GiB), so they live in pinned host memory and stream through, their copies overlapping compute.
STATES_GPU_BYTES = 1 << 30


def states_bytes(ctx: Context, which: str) -> int:
    """The size of a pass's float32 calibration states (``which``: "measure" or "quant"): this
    rank's rows' (every row's in one process)."""
    rows, length = ctx.folder.load_ids(which).shape
    rows = len(distributed.active().row_range(rows))
    return rows * length * ctx.cfg.hidden_size * 4


def states_home(ctx: Context, nbytes: int) -> tuple[torch.device, str | None]:
    """Where a pass keeps its calibration states (with the measurement's reference outputs:
    ``nbytes`` bytes in all): on the compute device, or in host memory when they would take more
    than :data:`STATES_GPU_BYTES` (``EXL2CONV_STATES=host`` or ``gpu`` decides instead). Returns
    the device and, for host memory, why."""
    mode = settings.active().states
    if ctx.device.type != "cuda" or mode == "gpu":
        return ctx.device, None
    if mode == "host":
        return torch.device("cpu"), f"{STATES_ENV}=host"
    if nbytes > STATES_GPU_BYTES:
        return torch.device("cpu"), (f"over {STATES_GPU_BYTES / 2**30:.0f} GiB; {STATES_ENV}=gpu keeps them on "
                                     "the GPU")
    return ctx.device, None


def stage_initial_embeddings(ctx: Context) -> None:
    ctx.rep.info("Token embeddings (measurement)...")
    ctx.rep.status("Embeddings", 0, 1)
    states = calib_rows.embed_states(ctx, ctx.folder.load_ids("measure"), which="measure")
    check_finite(states, "the token embeddings")
    ctx.folder.write_measurement({}, 0)
    ctx.folder.save_checkpoint("measure", 0, None, last_module_idx=0)  # cheaper to recompute than to store
    ctx.job.advance(Stage.SENSITIVITY)


def stage_sensitivity(ctx: Context) -> None:
    """The Fisher diagonal of every module's output (exl2conv.sensitivity), from the unquantized
    model on the first measurement rows; the measurement turns it into predicted KL."""
    ids = ctx.folder.load_ids("measure")
    ids = ids[~noise_rows.is_noise(ids)]  # of the text: the noise rows have no next tokens to predict
    rows = sensitivity.rows_for(ids, ctx.cfg.hidden_size, ctx.cfg.num_layers)
    ctx.rep.info(f"Output sensitivity of each module: {rows} rows x {ids.shape[1]} tokens, forward and backward")
    with ctx.rep.progress("Sensitivity", 2 * ctx.cfg.num_layers, "Sensitivity") as bar:
        # the module after which each of the Fisher's rows sits (a parallel block owns two)
        rows = [m.meas_key for m in ctx.modules if m.quantized for _ in range(2 if m.kind == "parallel" else 1)]
        fisher = sensitivity.fisher_diagonals(
            ctx.weights, ctx.cfg, ids, ctx.device, on_layer=lambda: bar.update(1),
            check=lambda m, x: check_finite(x, f"{rows[m]} output"), chunk=ctx.chunk(ids.shape[1]))
    if not bool(torch.isfinite(fisher).all()):
        raise Exl2Error("the output sensitivity holds NaN or Inf values (the model's forward or backward pass "
                        "overflows float32 on the calibration data); check the model's weights")
    ctx.folder.save_sensitivity(fisher)
    ctx.job.advance(Stage.MEASURE)


def _rope(ctx: Context, length: int):
    return forward.rope_tables(ctx.cfg, length, ctx.device)


def _measure_one(ctx: Context, mod: Module, states, rope, length: int, meas: dict, predicted: dict, fisher, arena,
                 bar):
    """Measure one module into ``meas`` and ``predicted``; returns the states after it. Leaves
    ``states`` as they were (a stop inside checkpoints them)."""
    if mod.quantized:
        w, _ = ctx.layer_weights(mod)
        # a parallel block is measured a branch at a time on the same inputs (the other branch
        # unquantized), into ExLlamaV2's {"attn": [...], "mlp": [...]}; both branches' errors land
        # in the layer's output, whose Fisher row is the second of the layer's two
        row = 2 * mod.layer + (mod.kind != "attn")
        measured, outputs = {}, None
        for part in mod.parts:
            outputs = None  # the first branch's reference outputs, freed: the second's pass remakes them
            run = ModuleRun.of(mod, w, ctx.cfg, rope, ctx.chunk(length), ctx.device, part)
            entries, outputs, pred = measure_module(
                run, states, part, mod.strategy_key(part), ctx.next_norm_weight(mod),
                on_coverage=lambda cov: report_coverage(ctx.rep, cov),
                fisher=None if fisher is None else fisher[row], arena=arena)
            del run
            if pred is not None:
                predicted[mod.strategy_key(part)] = pred
            best = max(e["accuracy"] for e in entries)
            if best < 0.1:
                raise Exl2Error(f"{mod.strategy_key(part)}: every candidate has accuracy below 0.1 (best "
                                f"{best:.4f}); the model's forward pass or calibration data is broken")
            measured[part] = entries
        meas[mod.meas_key] = measured if mod.kind == "parallel" else measured[mod.kind]
        states = outputs
        del w  # before the next module's weights are read (a 7B MLP's are 0.54 GiB)
        bar.update(1, module=mod.meas_key, best=f"{best:.5f}")
    else:
        meas[mod.meas_key] = None
        states = None if mod.kind == "norm" else states
        bar.update(1)
    return states


def stage_measure(ctx: Context) -> None:
    job = ctx.job
    ctx.rep.info("Measuring quantization impact...")
    nbytes = states_bytes(ctx, "measure")
    # the states and the reference outputs, two such tensors
    home, why = states_home(ctx, 2 * nbytes)
    if why is not None:
        ctx.rep.info(f"Calibration states and reference outputs ({2 * nbytes / 2**30:.2f} GiB) and the "
                     f"candidates' codes kept in host memory ({why}): streamed through the GPU")
    start, states = load_checkpoint(ctx, "measure", home)
    meas, predicted = ctx.folder.read_measurement()
    mods = ctx.modules
    # entries past the checkpoint belong to work that is about to be redone
    keep = {m.meas_key for m in mods[1:start + 1]}
    meas = {k: v for k, v in meas.items() if k in keep}
    fisher = ctx.folder.load_sensitivity()
    keep_predicted = {m.strategy_key(part) for m in mods[1:start + 1] if m.quantized for part in m.parts}
    predicted = {k: v for k, v in predicted.items() if k in keep_predicted} if fisher is not None else {}
    length = states.shape[1] if states is not None else 0
    rope = _rope(ctx, length)
    arena = codes_arena(ctx.cfg, ctx.device, mods[start + 1:]) if home != ctx.device else None
    distributed.active().barrier("the start of the measurement")  # every rank has read the folder

    def checkpoint(index: int, states) -> None:
        if distributed.active().is_main:
            ctx.folder.write_measurement(meas, index, predicted)
            faults.point("measurement")
        save_states(ctx, "measure", index, states if index else None, last_module_idx=index)

    def step(mod: Module, states, bar):
        return _measure_one(ctx, mod, states, rope, length, meas, predicted, fisher, arena, bar)

    try:
        run_modules(ctx, "Measuring", mods, start, states, step, checkpoint)
    finally:
        if arena is not None:
            arena.close()
    if job["output_measurement"] and distributed.active().is_main:
        dest = Path(job["output_measurement"])
        if dest.is_dir():
            dest = dest / MEASUREMENT
        atomic.write_bytes(dest, (ctx.out_dir / MEASUREMENT).read_bytes())
        ctx.rep.info(f"Measurement written to {dest}")
        job.advance(Stage.FINISHED)
    else:
        job.advance(Stage.OPTIMIZE)


def stage_optimize(ctx: Context) -> None:
    job = ctx.job
    ctx.rep.info("Optimizing...")
    ctx.rep.status("Optimizing", 0, 1)
    meas, pred = ctx.folder.read_measurement()
    source = str(job["reuse_measurement"] or ctx.out_dir / MEASUREMENT)
    chosen = allocation.allocate(ctx.cfg, ctx.weights, ctx.modules, meas, pred, job["bits"], source, ctx.rep)
    job.advance(Stage.TOKENS_CAL, strategy=chosen.strategy, solver=chosen.info)


def stage_tokens_cal(ctx: Context) -> None:
    ctx.rep.info("Tokenizing samples...")
    ctx.rep.status("Tokenizing (2)", 0, 1)
    tokenize_stage(ctx, "quant", Stage.EMBEDDINGS)


def stage_embeddings(ctx: Context) -> None:
    ctx.rep.info("Token embeddings again...")
    ctx.rep.status("Embeddings", 0, 1)
    # checked a few rows at a time, not kept: the quantization pass recomputes them (the
    # embeddings of 115 rows of 2048 tokens take 3.6 GiB for Llama-2-7B)
    ids = ctx.folder.load_ids("quant")
    for _, x in calib_rows.embedded_rows(ctx, ids, ctx.chunk(ids.shape[1]), "quant"):
        check_finite(x, "the token embeddings")
    ctx.folder.save_checkpoint("quant", 0, None, q_last_module_idx=0, quant_log=[])  # recomputed on loading
    ctx.job.advance(Stage.QUANT)


def save_linear(ctx: Context):
    """save(source name, tensors): into the name's out_tensor file, under the output names."""
    def save(name: str, tensors: dict[str, torch.Tensor]) -> None:
        out = arch.output_name(ctx.cfg, name)
        atomic.save_tensors(ctx.folder.out_tensor_file(name), {f"{out}.{k}": v for k, v in tensors.items()})
    return save


def stage_quant(ctx: Context) -> None:
    job = ctx.job
    ctx.rep.info("Quantizing...")
    nbytes = states_bytes(ctx, "quant")
    home, why = states_home(ctx, nbytes)
    if why is not None:
        ctx.rep.info(f"Calibration states ({nbytes / 2**30:.2f} GiB) kept in host memory ({why}): every module "
                     "streams its rows through the GPU")
    start, states = load_checkpoint(ctx, "quant", home)
    log = list(job["quant_log"] or [])
    log = [e for e in log if e["index"] <= start]
    mods = ctx.modules
    length = states.shape[1] if states is not None else 0
    rope = _rope(ctx, length)
    save = distributed.main_only(save_linear(ctx))
    # the unquantized model's residual stream on the first rows, the target of norm tweaking
    stream = unquantized_stream(ctx, mods[1:start + 1]) if tweak.enabled() else None
    distributed.active().barrier("the start of the quantization")  # every rank has read the folder

    def checkpoint(index: int, states) -> None:
        save_states(ctx, "quant", index, states if index else None, q_last_module_idx=index, quant_log=log)

    def step(mod: Module, states, bar):
        nonlocal stream
        states, stream, record = _quantize_one(ctx, mod, states, stream, rope, length, save, bar)
        log.append(record)
        return states

    run_modules(ctx, "Quantizing", mods, start, states, step, checkpoint)
    job.advance(Stage.COMPILE)


def _quantize_one(ctx: Context, mod: Module, states, stream, rope, length: int, save, bar):
    """Quantize one module; returns the states and the unquantized stream after it, and the
    module's quant_log record. ``states`` are overwritten only where no stop can come between
    (:func:`stop.held`), so a stop inside leaves them as they came in."""
    record: dict[str, Any] = {"index": mod.index, "key": mod.meas_key}
    if mod.quantized:
        w, _ = ctx.layer_weights(mod)
        run = ModuleRun.of(mod, w, ctx.cfg, rope, ctx.chunk(length), ctx.device)
        # per linear by short name: a parallel block's two entries name different linears
        entry = {k: v for part in mod.parts for k, v in ctx.job["strategy"][mod.strategy_key(part)].items()}
        if stream is not None:
            stream, _ = run_block(run, stream)
        states, rfn, reports, tweaked = quantize_module(
            run, states, entry, save, ctx.next_norm_weight(mod), on_coverage=lambda cov: report_coverage(ctx.rep, cov),
            target=stream)
        if tweaked is not None:
            norm = arch.norm_tensors(ctx.cfg, mod.layer, mod.parts[0])[0]
            tweak.save_norm(save, norm, tweaked.weight, ctx.cfg)
            record["tweak"] = [tweaked.before, tweaked.after]
        record.update(rfn_error=rfn, linears=[[r.name, r.desc, r.total_bits, r.numel] for r in reports])
        del w, run  # before the next module's weights (or the head's) are read
        bar.update(1, module=mod.meas_key, rfn=f"{rfn:.5f}")
    elif mod.kind in ("norm", "pos_emb"):
        bar.update(1)  # the embedding stage adds the positions; the head applies the final norm
    else:
        release_cached(ctx.device)  # the head's large buffers start from a clean slate
        record.update(quantize_head(ctx, states, save, stream))
        states = stream = None
        bar.update(1, ppl=f"{record['ppl']:.3f}")
    return states, stream, record


def unquantized_stream(ctx: Context, done: list[Module]) -> torch.Tensor:
    """The unquantized model's residual stream after the modules ``done`` (a resumed pass's),
    on the first rows of the quantization set that norm tweaking fits on."""
    ids = ctx.folder.load_ids("quant")
    ids = ids[:tweak.rows_for(ids.shape[0], ids.shape[1], ctx.device, ctx.numel_decoder() // ctx.cfg.num_layers)]
    x = calib_rows.embed_states(ctx, ids, which="quant")
    rope = _rope(ctx, ids.shape[1])
    for mod in done:
        if mod.quantized:
            w, _ = ctx.layer_weights(mod)
            x, _ = run_block(ModuleRun.of(mod, w, ctx.cfg, rope, ctx.chunk(ids.shape[1])), x)
    return x


def stage_compile(ctx: Context) -> None:
    job = ctx.job
    ctx.rep.info("Compiling output file...")
    cfg = ctx.cfg
    dest = Path(job["compile_full"]) if job["compile_full"] else ctx.out_dir
    dest.mkdir(parents=True, exist_ok=True)
    tensors, ends = compile_mod.output_tensors(cfg, ctx.weights, lambda prefix: ctx.folder.out_tensor_file(prefix))

    limit = int(float(job["shard_size"]) * 1024 ** 2)
    shards = compile_mod.plan_shards(tensors, ends, limit)
    ctx.rep.status("Compiling", 0, len(shards))
    written = compile_mod.write_shards(shards, dest, on_shard=lambda i, n: ctx.rep.status("Compiling", i, n))
    for fname, size in written:
        ctx.rep.info(f"Wrote {dest / fname} ({size / 2**20:.1f} MB)")
    if job["compile_full"]:
        copied = compile_mod.copy_model_files(Path(job["in_dir"]), dest)
        config = exllamav2_config.output_config(cfg)
        if config is not None:
            atomic.write_json(dest / "config.json", config, indent=4, ensure_ascii=True)
        compile_mod.write_quant_config(dest, job["bits"], job["head_bits"], calibration.quant_rows(job), job["length"],
                                       job["cal_dataset"])
        ctx.rep.info(f"Copied {', '.join(copied)}")
    job.advance(Stage.FINISHED, output_files=[str(dest / f) for f, _ in written])


# The stages whose work the ranks of a job on several devices share (the other ranks follow rank
# 0 into them: exl2conv.follow); the others rank 0 runs alone.
SHARED_STAGES = (Stage.MEASURE.value, Stage.QUANT.value)

STAGES = {
    Stage.BEGIN: stage_begin,
    Stage.INITIAL_EMBEDDINGS: stage_initial_embeddings,
    Stage.SENSITIVITY: stage_sensitivity,
    Stage.MEASURE: stage_measure,
    Stage.OPTIMIZE: stage_optimize,
    Stage.TOKENS_CAL: stage_tokens_cal,
    Stage.EMBEDDINGS: stage_embeddings,
    Stage.QUANT: stage_quant,
    Stage.COMPILE: stage_compile,
}


# -- the job ------------------------------------------------------------------------------------------


def configure_determinism() -> None:
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    torch.manual_seed(0)


def convert(values: dict[str, Any], out_dir: str | Path, no_resume: bool = False, device: str | None = None,
            rep: Reporter | None = None) -> Summary:
    """Run (or resume) a conversion job. ``values`` maps job fields (see :data:`exl2conv.job.ARGS`)
    to the values given; None means not given. Raises :class:`Exl2Error` on bad input."""
    rep = rep or Reporter(status_output=bool(values.get("status_output")))
    settings.set_library_defaults()
    out = Path(out_dir).expanduser().resolve()
    check_paths(values, out)
    current = settings.Settings.from_env()  # a bad EXL2CONV_* value is refused now, not hours later
    dev = pick_device(device)
    configure_determinism()
    fingerprint = reuse = None
    if values.get("in_dir"):
        # the model is checked before anything is created or cleared (-nr)
        in_dir = Path(values["in_dir"]).expanduser().resolve()
        fingerprint = model_fingerprint_of(*load_model(in_dir, values.get("rope_scale"), values.get("rope_alpha")))
        load_tokenizer(in_dir)
    check_work_dir(values, out, no_resume)
    if values.get("reuse_measurement") and (no_resume or not (out / JOB_FILE).exists()):
        reuse = load_measurement_file(Path(values["reuse_measurement"]))
        check_measurement_fingerprint(reuse, fingerprint, values)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise Exl2Error(f"-o {out}: cannot create the working folder ({exc.strerror}); choose a "
                        "writable folder") from None
    with WorkLock(out), settings.use(current):
        job = open_job(values, out, no_resume, rep, current.recorded(dev.type), fingerprint, reuse)
        # temporary files of writes that a crash cut short (also of a finished job's last save)
        for folder in (out, out / OUT_TENSOR, Path(job["compile_full"]) if job["compile_full"] else None):
            if folder is not None:
                atomic.remove_temps(folder)
        if job.stage == Stage.FINISHED:
            rep.info(f"The job in {out} has already finished; use -nr to start a new one")
            distributed.active().release()
            return summarize(job)
        return run_job(job, dev, rep)


def run_job(job: Job, dev: torch.device, rep: Reporter) -> Summary:
    """Run an opened job's stages from where it stands to the end. Ctrl-C asks for a stop at the
    next safe point (:mod:`exl2conv.stop`); a second Ctrl-C stops at once."""
    out = job.out_dir
    rep.status_output = bool(job["status_output"])
    cfg, weights = load_model(Path(job["in_dir"]), job["rope_scale"], job["rope_alpha"])
    check_model_unchanged(job, cfg, weights)
    if STAGE_ORDER.index(job.stage) <= STAGE_ORDER.index(Stage.OPTIMIZE) and not job["output_measurement"]:
        allocation.check_bits_reachable(cfg, job["bits"], weights)
    if not job["output_measurement"]:
        check_shard_size(cfg, weights, float(job["shard_size"]))
    check_positions(cfg, job)
    ctx = Context(job, cfg, weights, dev, rep)
    (out / OUT_TENSOR).mkdir(exist_ok=True)
    ctx.folder.remove_stray_checkpoints()
    print_plan(job, dev, rep, cfg)

    def on_sigint(signum, frame):
        if stop.requested():
            raise KeyboardInterrupt
        stop.request()
        rep.warn("Ctrl-C: stopping at the next safe point, within seconds (press again to stop at once)")

    stop.reset()
    previous = signal.signal(signal.SIGINT, on_sigint) if _main_thread() else None
    try:
        while job.stage != Stage.FINISHED:
            stage = job.stage
            job.start_clock(stage)  # the stage's own advance records its time
            distributed.active().lead(stage.value, SHARED_STAGES, [s.value for s in STAGE_ORDER])
            try:
                faults.point("stage_start")
                STAGES[stage](ctx)
            except stop.StopRequested:
                raise Interrupted(f"stopped in stage {stage.value}; state saved in {out}: run the same "
                                  "command to resume") from None
            release_cached(ctx.device)
            faults.point("stage")
            if stop.requested() and job.stage != Stage.FINISHED:
                raise Interrupted(f"stopped after stage {stage.value}; state saved in {out}: run the same "
                                  "command to resume")
        distributed.active().release()
    finally:
        if previous is not None:
            signal.signal(signal.SIGINT, previous)
        stop.reset()
    return summarize(ctx.job)


def _main_thread() -> bool:
    import threading
    return threading.current_thread() is threading.main_thread()
