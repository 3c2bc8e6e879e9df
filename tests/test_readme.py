"""The README's examples as written: its Python blocks run, its `blitzdiff` command lines parse, its parameter counts
are what `blitzdiff info` reports.

Which Python blocks run: every ```python block is compiled; it is also executed, as written, in a fresh namespace,
unless it contains "cuda" (it needs a GPU) or "path/to/" (it needs the user's own checkpoint or files). The test
ids name each executed block by its first line in README.md; `test_some_blocks_run` requires at least one.
"""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest

from blitzdiff.cli import build_parser
from blitzdiff.engine.loading import EMBEDDED, model_path
from blitzdiff.models import PRESETS, build_preset, describe

README = Path(__file__).resolve().parent.parent / "README.md"
NOT_RUN = {"cuda": "needs a GPU", "path/to/": "needs the user's files"}


def blocks(language: str) -> list[tuple[int, str]]:
    """(line of the opening fence, text) of each fenced block of `language`."""
    found, lines, start = [], README.read_text().splitlines(), None
    for number, line in enumerate(lines, 1):
        if start is None and line.strip() == f"```{language}":
            start = number
        elif start is not None and line.strip() == "```":
            found.append((start, "\n".join(lines[start:number - 1])))
            start = None
    assert start is None, f"README.md:{start}: unclosed ```{language} block"
    return found


PYTHON = blocks("python")
RUNNABLE = [(line, code) for line, code in PYTHON if not any(marker in code for marker in NOT_RUN)]


@pytest.mark.parametrize(("line", "code"), PYTHON, ids=[f"README.md:{line}" for line, _ in PYTHON])
def test_every_python_block_compiles(line, code):
    compile(code, f"README.md:{line}", "exec")


@pytest.mark.parametrize(("line", "code"), RUNNABLE, ids=[f"README.md:{line}" for line, _ in RUNNABLE])
def test_python_block_runs_as_written(line, code, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # whatever a block writes stays out of the repository
    exec(compile(code, f"README.md:{line}", "exec"), {"__name__": f"readme_{line}"})


def test_some_blocks_run():
    assert PYTHON and RUNNABLE, f"{len(PYTHON)} Python blocks, none runnable under the rule {NOT_RUN}"


def command_lines(program: str) -> list[tuple[int, list[str]]]:
    """(block line, argv) of every `program ...` command in the ```bash blocks (continuations joined, comments
    dropped, `&&` chains split)."""
    commands = []
    for line, text in blocks("bash"):
        for command in text.replace("\\\n", " ").splitlines():
            for part in command.split("&&"):
                words = shlex.split(part, comments=True)
                if words[:1] == [program]:
                    commands.append((line, words[1:]))
    return commands


COMMANDS = command_lines("blitzdiff")
TORCHRUN = command_lines("torchrun")  # torchrun ... -m blitzdiff sample ...


@pytest.mark.parametrize(("line", "argv"), COMMANDS, ids=[" ".join(argv[:3]) for _, argv in COMMANDS])
def test_command_lines_parse(line, argv):
    args = build_parser().parse_args(argv)  # an unknown option or bad value exits with status 2
    assert args.command == argv[0], f"README.md:{line}"


@pytest.mark.parametrize(("line", "argv"), TORCHRUN, ids=[" ".join(argv[:4]) for _, argv in TORCHRUN])
def test_torchrun_lines_parse(line, argv):
    """torchrun's own options parse with torchrun's parser, and what it runs is `python -m blitzdiff` with options
    that parse."""
    from torch.distributed.run import get_args_parser

    launcher = get_args_parser().parse_args(argv)
    assert (launcher.module, launcher.training_script) == (True, "blitzdiff"), f"README.md:{line}"
    args = build_parser().parse_args(launcher.training_script_args)
    assert args.command == "sample" and args.out_dir, f"README.md:{line}"


def test_parameter_counts_agree_with_info():
    text = " ".join(README.read_text().split())
    for name in EMBEDDED:
        (stated,) = re.findall(rf"`{name}`: [^(]*\(([\d.]+) M parameters", text)
        assert float(stated) == round(describe(model_path(name))["parameters"] / 1e6, 2), name
    for name in PRESETS:
        (stated,) = re.findall(rf"\| `{name}` \|(?:[^|]*\|){{3}} ([\d,]+) \|", text)
        model, _ = build_preset(name, device="meta")
        assert int(stated.replace(",", "")) == sum(p.numel() for p in model.parameters()), name
