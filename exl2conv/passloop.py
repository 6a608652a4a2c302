"""The loop both passes (measurement, quantization) run over the model's modules: the progress
bar, fault points, checkpoint timing and stopping on Ctrl-C, written once.

A pass hands in what differs: ``step`` runs one module and returns the calibration states after
it, ``checkpoint`` saves the pass's state after a module. A stop requested inside a module
(:class:`stop.StopRequested`, raised only where the module's inputs are intact) checkpoints the
state before it; one requested between modules lets the module finish and checkpoints after it.
"""

from __future__ import annotations

import contextlib
import time
from typing import Any, Callable

import torch

from exl2conv import distributed, faults, stop
from exl2conv.errors import Interrupted
from exl2conv.layers import Module

Step = Callable[[Module, Any, Any], Any]           # (module, states, progress bar) -> states after it
Checkpoint = Callable[[int, Any], None]            # (module index, states after it)


def run_modules(ctx, label: str, mods: list[Module], start: int, states: torch.Tensor | None, step: Step,
                checkpoint: Checkpoint) -> None:
    """Run ``step`` over ``mods[start + 1:]`` (``ctx``: the job's :class:`pipeline.Context`),
    checkpointing after the final module, every -cpi seconds, and when a stop is requested."""
    last_cp = time.monotonic()
    world = distributed.active()
    # Several ranks: a checkpoint gathers every rank's rows, so all ranks must take it together.
    # Rank 0 decides when (its clock, its Ctrl-C) and tells the others after each module; a stop
    # waits for the end of the module (no rank can gather while the others are inside one).
    whole = stop.held if world.shared else contextlib.nullcontext
    with ctx.rep.progress(label, len(mods) - 1, label, initial=start) as bar:
        for mod in mods[start + 1:]:
            try:
                with whole():
                    after = step(mod, states, bar)
            except stop.StopRequested:
                raise _stopped_in(ctx, mod, lambda index: checkpoint(index, states)) from None
            states = after
            final = mod.index == len(mods) - 1
            faults.point("module")
            due = final or _checkpoint_due(ctx, last_cp)
            if world.shared:
                due = world.broadcast(due, f"the checkpoint after {mod.meas_key}")
            if due:
                checkpoint(mod.index, states)
                last_cp = time.monotonic()
                if stop.requested() and not final:
                    raise Interrupted(f"stopped after {mod.meas_key}; state saved in {ctx.out_dir}: run the same "
                                      "command to resume")


def _checkpoint_due(ctx, last: float) -> bool:
    return time.monotonic() - last >= float(ctx.job["checkpoint_interval"]) or stop.requested()


def _stopped_in(ctx, mod: Module, checkpoint: Callable[[int], None]) -> Interrupted:
    """Ctrl-C reached a safe point inside ``mod``: its inputs are intact, so ``checkpoint(index)``
    saves them as the state after the module before (unless the job's checkpoint is there
    already) and the resume starts with ``mod``. Returns the error to raise."""
    if (ctx.job["checkpoint"] or {}).get("module") != mod.index - 1:
        checkpoint(mod.index - 1)
    return Interrupted(f"stopped in {mod.meas_key}; state saved in {ctx.out_dir} up to the module before it: "
                       "run the same command to resume")
