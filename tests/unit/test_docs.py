"""docs/cli.md lists every option string that --help shows, for the converter and each subcommand."""

import re
from pathlib import Path

import pytest

from exl2conv import cli
from exl2conv.runtime.generate import generate_parser

DOC = Path(__file__).resolve().parents[2] / "docs" / "cli.md"
PARSERS = {"convert": cli.build_parser, "inspect": cli.inspect_parser, "eval": cli.eval_parser,
           "demo": cli.demo_parser, "to-safetensors": cli.to_safetensors_parser,
           "generate": generate_parser}


def help_options(parser) -> set[str]:
    """Option strings as --help prints them (e.g. -ml, --measurement_length)."""
    text = parser.format_help()
    return set(re.findall(r"(?<![\w-])(--?[A-Za-z][\w-]*)", text.split("options:", 1)[1]))


@pytest.mark.parametrize("name", sorted(PARSERS))
def test_every_flag_in_help_is_documented(name):
    parser = PARSERS[name]()
    shown = help_options(parser)
    declared = {s for a in parser._actions for s in a.option_strings}
    assert declared <= shown | {"-h", "--help"} and "--help" in shown
    doc = DOC.read_text(encoding="utf-8")
    missing = sorted(o for o in shown if f"`{o}`" not in doc)
    assert not missing, f"docs/cli.md lacks {missing} (exl2conv {name} --help)"


def test_subcommands_have_sections():
    doc = DOC.read_text(encoding="utf-8")
    for sub in cli.SUBCOMMANDS:
        assert f"## `exl2conv {sub}" in doc


def test_defaults_in_doc_match_job_args():
    from exl2conv.job import ARGS

    doc = DOC.read_text(encoding="utf-8")
    for arg in ARGS:
        if arg.default in (None, False):
            continue
        row = next((line for line in doc.splitlines() if line.startswith(f"| `{arg.flag}`")), None)
        assert row is not None, arg.flag
        default = row.split("|")[2].strip()
        assert float(default) == float(arg.default), (arg.flag, default, arg.default)
