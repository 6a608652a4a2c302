import re

import pytest

from exl2conv import __version__, settings
from exl2conv.errors import Exl2Error
from exl2conv.settings import Settings


def test_defaults_when_nothing_is_set():
    assert Settings.from_env({}) == Settings()
    assert Settings.from_env({"EXL2CONV_NO_TWEAK": "", "EXL2CONV_STATES": "", "OTHER": "x"}) == Settings()


def test_every_variable_is_parsed():
    env = {"EXL2CONV_NO_TWEAK": "1", "EXL2CONV_TWEAK_TOKENS": "4096", "EXL2CONV_OBJECTIVE": "error",
           "EXL2CONV_NO_TF32": "1", "EXL2CONV_HALF_ATTENTION": "1", "EXL2CONV_GRAD_ATTENTION": "math",
           "EXL2CONV_NO_KERNELS": "1", "EXL2CONV_FUSED_KERNELS": "0", "EXL2CONV_READ_AHEAD": "0",
           "EXL2CONV_STATES": "host"}
    assert Settings.from_env(env) == Settings(
        tweak=False, tweak_tokens=4096, objective="error", tf32=False, half_attention=True, grad_attention="math",
        kernels=False, fused_kernels=False, read_ahead=False, states="host")
    assert Settings.from_env({"EXL2CONV_NO_TWEAK": "0", "EXL2CONV_FUSED_KERNELS": "1"}) == Settings()


@pytest.mark.parametrize("name,value,says", [
    ("EXL2CONV_NO_TWEAK", "yes", "give 1 (on) or 0 (off)"),
    ("EXL2CONV_TWEAK_TOKENS", "0", "give a positive number of tokens"),
    ("EXL2CONV_TWEAK_TOKENS", "1.5", "give a positive number of tokens"),
    ("EXL2CONV_OBJECTIVE", "loss", "give kl or error"),
    ("EXL2CONV_GRAD_ATTENTION", "flash", "give blocked or math"),
    ("EXL2CONV_STATES", "vram", "give auto, gpu or host"),
    ("EXL2CONV_READ_AHEAD", "no", "give 0 (off) or 1 (on)"),
])
def test_a_bad_value_names_the_variable_and_what_it_takes(name, value, says):
    with pytest.raises(Exl2Error, match="^" + re.escape(f"{name}={value}: {says}")):
        Settings.from_env({name: value})


def test_recorded_keeps_output_settings_only_as_they_act_on_the_device():
    fast = Settings(kernels=False, fused_kernels=False, read_ahead=False, states="host")
    assert fast.recorded("cuda") == Settings().recorded("cuda")  # speed settings are not recorded
    gpu_only = Settings(tf32=False, half_attention=True, grad_attention="math")
    assert gpu_only.recorded("cpu") == Settings().recorded("cpu")  # no TF32 or GPU attention on a CPU
    assert gpu_only.recorded("cuda") != Settings().recorded("cuda")
    assert Settings(tweak=False, tweak_tokens=512).recorded("cpu") == Settings(tweak=False).recorded("cpu")
    rec = Settings(tweak_tokens=512).recorded("cpu")
    assert rec["version"] == __version__ and rec["device"] == "cpu" and rec["tweak_tokens"] == 512


def test_differences_name_each_setting_and_its_variable():
    saved = Settings().recorded("cuda")
    now = Settings(objective="error", tf32=False).recorded("cuda")
    assert settings.differences(saved, now) == [
        "solver objective (EXL2CONV_OBJECTIVE): saved 'kl', now 'error'",
        "TF32 matmuls (EXL2CONV_NO_TF32): saved True, now False"]
    assert settings.differences(saved, saved) == []
    assert settings.differences(None, now)[0] == f"exl2conv version: saved None, now {__version__!r}"


def test_active_follows_the_environment_unless_a_conversion_fixed_it(monkeypatch):
    monkeypatch.delenv("EXL2CONV_NO_TWEAK", raising=False)
    assert settings.active().tweak
    monkeypatch.setenv("EXL2CONV_NO_TWEAK", "1")
    assert not settings.active().tweak
    with settings.use(Settings()):
        assert settings.active().tweak  # a variable changed during a conversion changes nothing
    assert not settings.active().tweak


def test_active_sees_a_changed_value_and_a_removed_variable(monkeypatch):
    """The settings are cached per value of the EXL2CONV_ variables (read from os.environ's raw
    bytes on POSIX): a new value and a removed variable are each seen at the next call."""
    monkeypatch.setenv("EXL2CONV_NO_TWEAK", "1")
    assert not settings.active().tweak
    monkeypatch.setenv("EXL2CONV_NO_TWEAK", "0")
    assert settings.active().tweak
    monkeypatch.setenv("EXL2CONV_NO_TWEAK", "1")
    assert not settings.active().tweak
    monkeypatch.delenv("EXL2CONV_NO_TWEAK")
    assert settings.active().tweak
