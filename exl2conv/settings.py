"""The EXL2CONV_* environment settings, parsed in one place into one typed object.

Two kinds of setting live here, and the difference decides what a resumed job may do:

- **Output settings** change the bytes a job writes (norm tweaking and its token budget, the
  solver's objective, TF32 and the attention kernels of the GPU forwards). A job records them in
  job.json, with the exl2conv version and the kind of device it computes on
  (:meth:`Settings.recorded`), and a resume under other values is refused with the differences
  named (:func:`differences`): a job half made one way and half another matches no command.
- **Speed settings** only change how fast or where the same arithmetic runs (the CUDA kernels,
  reading weights ahead, where the calibration states live). They are not recorded;
  tests/e2e/test_resume.py and tests/gpu/test_determinism.py show they give the same bytes.

docs/cli.md lists every variable for users. Code reads the settings with :func:`active`, never
``os.environ``: a conversion parses the environment once when it starts and runs under that
object (:func:`use`), so a variable changed while it runs changes nothing.
"""

from __future__ import annotations

import os
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Mapping

from exl2conv import __version__
from exl2conv.errors import Exl2Error

PREFIX = "EXL2CONV_"
GRAD_ATTENTION_MODES = ("blocked", "math")
STATES_MODES = ("auto", "gpu", "host")
OBJECTIVES = ("kl", "error")
ASYMMETRIC_LEVELS = 2  # EXL2CONV_ASYMMETRIC takes 0 .. this


@dataclass(frozen=True)
class Settings:
    # -- output settings (recorded in job.json) --
    tweak: bool = True                # EXL2CONV_NO_TWEAK=1 turns norm tweaking off
    tweak_tokens: int | None = None   # EXL2CONV_TWEAK_TOKENS; None: the device's default budget
    objective: str = "kl"             # EXL2CONV_OBJECTIVE=error: ExLlamaV2's objective even with predicted KL
    tf32: bool = True                 # EXL2CONV_NO_TF32=1: GPU module matmuls in full float32
    half_attention: bool = False      # EXL2CONV_HALF_ATTENTION=1: float16 flash attention in grad passes
    grad_attention: str = "blocked"   # EXL2CONV_GRAD_ATTENTION: blocked or math
    # EXL2CONV_ASYMMETRIC=1: o_proj/down_proj fitted to the unquantized outputs; 2: the same with
    # down_proj's descent damped more (exl2conv.asymmetric.DOWN_DAMP); 0: off
    asymmetric: int = 0
    # -- speed settings (not recorded: the same bytes either way) --
    kernels: bool = True              # EXL2CONV_NO_KERNELS=1: no CUDA extension, torch paths only
    fused_kernels: bool = True        # EXL2CONV_FUSED_KERNELS=0: the fused kernels' torch paths
    read_ahead: bool = True           # EXL2CONV_READ_AHEAD=0: no background reads of the next weights
    states: str = "auto"              # EXL2CONV_STATES: auto, gpu or host

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> "Settings":
        """The settings of ``environ`` (default: the process's), each value checked: a bad one
        is an :class:`Exl2Error` naming the variable and the values it takes."""
        env = os.environ if environ is None else environ

        def raw(name: str) -> str:
            return env.get(PREFIX + name, "").strip()

        def switch(name: str) -> bool:
            """A 0/1 variable: unset, empty or 0 is off, 1 is on."""
            value = raw(name)
            if value not in ("", "0", "1"):
                raise Exl2Error(f"{PREFIX}{name}={value}: give 1 (on) or 0 (off), or leave it unset")
            return value == "1"

        def level(name: str, top: int) -> int:
            """A 0..top variable: unset or empty is 0."""
            value = raw(name)
            if value not in ("",) + tuple(str(i) for i in range(top + 1)):
                raise Exl2Error(f"{PREFIX}{name}={value}: give one of {', '.join(str(i) for i in range(top + 1))}, "
                                "or leave it unset")
            return int(value or 0)

        def choice(name: str, allowed: tuple[str, ...]) -> str:
            value = raw(name) or allowed[0]
            if value not in allowed:
                raise Exl2Error(f"{PREFIX}{name}={value}: give {', '.join(allowed[:-1])} or {allowed[-1]} "
                                "(or leave it unset)")
            return value

        tokens = raw("TWEAK_TOKENS")
        budget = None
        if tokens:
            try:
                budget = int(tokens)
            except ValueError:
                budget = 0
            if budget <= 0:
                raise Exl2Error(f"{PREFIX}TWEAK_TOKENS={tokens}: give a positive number of tokens (or leave it unset)")
        fused = raw("FUSED_KERNELS")
        read_ahead = raw("READ_AHEAD")
        for name, value in (("FUSED_KERNELS", fused), ("READ_AHEAD", read_ahead)):
            if value not in ("", "0", "1"):
                raise Exl2Error(f"{PREFIX}{name}={value}: give 0 (off) or 1 (on), or leave it unset")
        return cls(
            tweak=not switch("NO_TWEAK"),
            tweak_tokens=budget,
            objective=choice("OBJECTIVE", OBJECTIVES),
            tf32=not switch("NO_TF32"),
            half_attention=switch("HALF_ATTENTION"),
            grad_attention=choice("GRAD_ATTENTION", GRAD_ATTENTION_MODES),
            asymmetric=level("ASYMMETRIC", ASYMMETRIC_LEVELS),
            kernels=not switch("NO_KERNELS"),
            fused_kernels=fused != "0",
            read_ahead=read_ahead != "0",
            states=choice("STATES", STATES_MODES),
        )

    def recorded(self, device_type: str) -> dict[str, Any]:
        """What job.json keeps of these settings for a job computing on ``device_type`` ("cuda"
        or "cpu"): the exl2conv version, the device type and every output setting, each as it acts
        there (TF32 and the attention kernels only exist on CUDA: on a CPU they change nothing and
        are recorded as their defaults, so a CPU job does not refuse to resume over them). The
        asymmetric mode is recorded only when on, level 1 as ``True`` (its first form): a job made
        before it existed, or before level 2, resumes as it was."""
        cuda = device_type == "cuda"
        default = Settings()
        return {
            "version": __version__,
            "device": device_type,
            "tweak": self.tweak,
            "tweak_tokens": self.tweak_tokens if self.tweak else None,
            "objective": self.objective,
            "tf32": self.tf32 if cuda else default.tf32,
            "half_attention": self.half_attention if cuda else default.half_attention,
            "grad_attention": (self.grad_attention if cuda and not self.half_attention
                               else default.grad_attention),
        } | ({"asymmetric": True if self.asymmetric == 1 else self.asymmetric} if self.asymmetric else {})


# How each recorded field is set, for the refusal's message.
SOURCES = {
    "version": "exl2conv version",
    "device": "device (--device)",
    "tweak": "norm tweaking (EXL2CONV_NO_TWEAK)",
    "tweak_tokens": "norm tweaking's tokens (EXL2CONV_TWEAK_TOKENS)",
    "objective": "solver objective (EXL2CONV_OBJECTIVE)",
    "tf32": "TF32 matmuls (EXL2CONV_NO_TF32)",
    "half_attention": "float16 attention (EXL2CONV_HALF_ATTENTION)",
    "grad_attention": "attention kernels (EXL2CONV_GRAD_ATTENTION)",
    "asymmetric": "asymmetric calibration (EXL2CONV_ASYMMETRIC)",
}


def differences(saved: Mapping[str, Any] | None, now: Mapping[str, Any]) -> list[str]:
    """Recorded settings that differ, as ``what: saved X, now Y``; a job without recorded settings
    (made by an exl2conv before they were recorded) differs in its version."""
    saved = dict(saved or {})
    keys = list(now) + [key for key in saved if key not in now]  # a field recorded only when on
    return [f"{SOURCES.get(key, key)}: saved {saved.get(key)!r}, now {now.get(key)!r}"
            for key in keys if saved.get(key) != now.get(key)]


# The settings in force: set by :func:`use` for a conversion; otherwise parsed from the
# environment as it is (cached per value of the variables, so a test that sets a variable is seen).
_in_use: list[Settings] = []
_parsed: dict[tuple, Settings] = {}
_PREFIX_BYTES = PREFIX.encode()


def _environment_key() -> tuple:
    """The EXL2CONV_ variables and their values, as a cache key. On POSIX CPython os.environ keeps
    the raw bytes in ``_data``; scanning those is ~10x cheaper than os.environ.items(), which
    decodes every variable (~30 us with a few dozen), and the runtime's linears ask for the
    settings on every forward, hundreds of times per decoded token."""
    raw = getattr(os.environ, "_data", None)
    if os.name == "posix" and isinstance(raw, dict):
        return tuple(sorted((k, v) for k, v in raw.items() if k.startswith(_PREFIX_BYTES)))
    return tuple(sorted((k, v) for k, v in os.environ.items() if k.startswith(PREFIX)))


def active() -> Settings:
    """The settings code should act on now."""
    if _in_use:
        return _in_use[-1]
    key = _environment_key()
    if key not in _parsed:
        _parsed.clear()
        _parsed[key] = Settings.from_env()
    return _parsed[key]


@contextmanager
def use(settings: Settings) -> Iterator[Settings]:
    """Run a block under ``settings`` (what :func:`active` returns inside it)."""
    _in_use.append(settings)
    try:
        yield settings
    finally:
        _in_use.pop()


# -- the variables that are not settings of a conversion ----------------------------------------------


def cache_root() -> Path:
    """``EXL2CONV_CACHE``, or ``~/.cache/exl2conv``: where the CUDA extension's builds and the
    demo's model are kept. Where files are cached changes no result, so it is read when asked."""
    return Path(os.environ.get(PREFIX + "CACHE") or Path.home() / ".cache" / "exl2conv")


FAULT_VARIABLE = PREFIX + "FAULT"


def fault_spec() -> str:
    """``EXL2CONV_FAULT``, the tests' fault injection (:mod:`exl2conv.faults`); read at every
    fault point, so a test that sets it for a child process needs nothing else."""
    return os.environ.get(FAULT_VARIABLE, "")


def cuda_arch_list(device_arch: str) -> str:
    """The GPU architectures the CUDA extension is built for: torch's ``TORCH_CUDA_ARCH_LIST``
    where the user set it (to build for other GPUs too), else this GPU's (``device_arch``, e.g.
    "9.0"), which is then set for torch's build to read."""
    return os.environ.setdefault("TORCH_CUDA_ARCH_LIST", device_arch)


def set_library_defaults() -> None:
    """The defaults exl2conv wants for torch's own variables, unless the user set them: growable
    CUDA cache segments (read when CUDA first allocates: instead of fixed blocks they keep the
    measurement pass's many differently-sized buffers from fragmenting the cache, which took a 7B
    layer's peak reserved memory to 22 GiB), and cuBLAS's fixed workspace, which its deterministic
    mode needs (the same command gives the same bytes)."""
    os.environ.setdefault("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")


# -- several processes (exl2conv.distributed, exl2conv.launch) --------------------------------------

# Set by exl2conv's own launcher (-d with several devices) in the processes it starts: it reports a
# lost rank itself, so the ranks that only lost contact with it stay quiet.
SUPERVISED_VARIABLE = PREFIX + "SUPERVISED"
DIST_TIMEOUT_VARIABLE = PREFIX + "DIST_TIMEOUT"
DEFAULT_DIST_TIMEOUT = 1800.0


@dataclass(frozen=True)
class RankEnvironment:
    """What torchrun (or exl2conv's launcher) tells a process about its place in the job."""
    rank: int
    world_size: int
    local_rank: int
    local_world_size: int  # ranks on this host
    supervised: bool
    timeout: float  # seconds a collective waits for the other ranks


def rank_environment() -> RankEnvironment | None:
    """This process's rank, from torch.distributed's variables (RANK, WORLD_SIZE, LOCAL_RANK; the
    process group itself reads MASTER_ADDR and MASTER_PORT), or None outside a launched job."""
    env = os.environ
    if "WORLD_SIZE" not in env or "RANK" not in env:
        return None
    try:
        rank, size = int(env["RANK"]), int(env["WORLD_SIZE"])
        local = int(env.get("LOCAL_RANK", env["RANK"]))
        local_size = int(env.get("LOCAL_WORLD_SIZE", env["WORLD_SIZE"]))
        timeout = float(env.get(DIST_TIMEOUT_VARIABLE) or DEFAULT_DIST_TIMEOUT)
    except ValueError:
        raise Exl2Error("RANK, WORLD_SIZE, LOCAL_RANK and EXL2CONV_DIST_TIMEOUT must be numbers (torchrun sets "
                        "the first three)") from None
    if not 0 <= rank < size or timeout <= 0:
        raise Exl2Error(f"RANK={rank}, WORLD_SIZE={size}, {DIST_TIMEOUT_VARIABLE}={timeout}: the rank must be "
                        "below the world size and the timeout positive")
    return RankEnvironment(rank, size, local, max(1, local_size), env.get(SUPERVISED_VARIABLE) == "1", timeout)


def rank_child_environment(rank: int, world_size: int, port: int) -> dict[str, str]:
    """The environment of rank ``rank`` started by exl2conv's launcher on this machine: the
    parent's, plus torch.distributed's variables for a process group on the loopback address."""
    return {**os.environ, "RANK": str(rank), "WORLD_SIZE": str(world_size), "LOCAL_RANK": str(rank),
            "LOCAL_WORLD_SIZE": str(world_size), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port),
            SUPERVISED_VARIABLE: "1"}
