"""A rank other than 0 of a job on several devices: it follows rank 0 into the stages whose work
the ranks share (:data:`pipeline.SHARED_STAGES`) and writes nothing.

Rank 0 runs the job as one process would (:func:`pipeline.convert`), and before a shared stage
tells the others its name (:meth:`World.lead`). A follower then reads the job as rank 0 saved it,
runs the same stage function on the same inputs from the working folder, and takes part in the
stage's collectives; its job's saves do nothing (:class:`FollowedJob`) and the stage's own writes
are rank 0's alone. Rank 0 decides everything that depends on time or on Ctrl-C (checkpoints,
stops): a follower ignores SIGINT and, when rank 0 stops, loses contact with it and exits.
"""

from __future__ import annotations

import signal
from pathlib import Path

from exl2conv import distributed, settings
from exl2conv.errors import Exl2Error
from exl2conv.job import Job, Stage
from exl2conv.report import Reporter


class FollowedJob(Job):
    """Rank 0's job as a follower reads it: every save is rank 0's, so here it does nothing."""

    def save(self) -> None:
        pass


def follow(world: distributed.World, out_dir: str | Path) -> None:
    """Follow rank 0 through the job in ``out_dir`` until it releases this rank."""
    from exl2conv.pipeline import STAGES, Context, configure_determinism
    from exl2conv.validate import load_model

    signal.signal(signal.SIGINT, signal.SIG_IGN)  # rank 0 alone stops the job (it gets the Ctrl-C)
    out = Path(out_dir).expanduser().resolve()
    current = settings.Settings.from_env()
    configure_determinism()
    rep = Reporter(quiet=True)
    while True:
        stage = world.broadcast(None, "waiting for rank 0's next stage")
        if stage is None:
            return
        job = FollowedJob(out, Job.load(out).data)
        recorded = current.recorded(world.device.type)
        changed = settings.differences(job["settings"], recorded)
        if changed:
            raise Exl2Error(f"this rank's settings differ from the job's ({'; '.join(changed)}); run every rank "
                            "with the same EXL2CONV_* settings, version and kind of device")
        cfg, weights = load_model(Path(job["in_dir"]), job["rope_scale"], job["rope_alpha"])
        with settings.use(current):
            STAGES[Stage(stage)](Context(job, cfg, weights, world.device, rep))
