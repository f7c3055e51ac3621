"""The README's commands: every `python <script>` / `torchrun <script>` line in its bash blocks, and
in the scripts' docstrings, names flags the script accepts (parsed by the script's own argument
parser, nothing run)."""
import argparse
import ast
import importlib.util
import re
import shlex
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


SCRIPTS = ["train_sft.py", "train_grpo.py", "eval.py", "data/toyworld/run.py", "data/toyworld/prepare.py",
           "data/convert.py"]


def commands_in(text):
    """(script, argv) of each `python` / `torchrun` command line in text, continuation lines joined."""
    commands = []
    for line in re.sub(r"\\\n\s*", " ", text).splitlines():
        if not re.match(r"\s*([A-Z_]+=\S*\s+)*(python|torchrun)\s", line):   # prose, comments, other commands
            continue
        words = shlex.split(line, comments=True)
        words = [w for w in words if not re.fullmatch(r"[A-Z_]+=.*", w)]   # environment variables
        if not words or words[0] not in ("python", "torchrun"):
            continue
        words = [re.sub(r"^\$\(.*\)$", "text", w) for w in words[1:] if not w.startswith("--nproc")]
        if words[0] == "-m" or "..." in words or any("$" in w for w in words):   # pytest; shell variables
            continue
        commands.append((words[0], words[1:]))
    return commands


def readme_commands():
    """The commands in the README's bash blocks, and each variant of its ablation loop."""
    commands = []
    for block in re.findall(r"```bash\n(.*?)```", (ROOT / "README.md").read_text(), re.S):
        commands += commands_in(block)
        for array in re.findall(r"\bx=\((.*?)\);;", block):   # the ablation loop's variants of run.py
            flags = shlex.split(array)
            commands.append(("data/toyworld/run.py", ["--out", "o"] + flags))
            for flag in flags:   # and what they hand on to train_grpo.py
                if flag.startswith("--grpo-args="):
                    commands.append(("train_grpo.py", ["--model", "m", "--tasks", "t"] + shlex.split(flag.split("=", 1)[1])))
    return commands


def docstring_commands():
    """The commands the scripts' own docstrings give (what a reader of the script copies)."""
    return [c for script in SCRIPTS for c in commands_in(ast.get_docstring(ast.parse((ROOT / script).read_text())))]


class Parsed(Exception):
    pass


def test_the_readme_has_commands():
    scripts = {script for script, _ in readme_commands()}
    assert {"data/toyworld/run.py", "data/toyworld/prepare.py", "eval.py", "train_sft.py", "train_grpo.py"} <= scripts


def test_the_docstrings_have_commands():
    assert {script for script, _ in docstring_commands()} == set(SCRIPTS)


@pytest.mark.parametrize("script, argv", readme_commands() + docstring_commands(),
                         ids=lambda v: v if isinstance(v, str) else "")
def test_readme_command_flags_parse(script, argv, monkeypatch):
    spec = importlib.util.spec_from_file_location(f"readme_{Path(script).stem}", ROOT / script)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    parse = argparse.ArgumentParser.parse_args

    def parse_then_stop(self, args=None, namespace=None):
        raise Parsed(parse(self, args, namespace))   # an unknown flag or a bad value exits inside parse

    monkeypatch.setattr(argparse.ArgumentParser, "parse_args", parse_then_stop)
    with pytest.raises(Parsed):
        (module.parse_args if hasattr(module, "parse_args") else module.main)(argv)
