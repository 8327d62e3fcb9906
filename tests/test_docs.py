"""The docs say only what runs: every relative link resolves, and every command shown in a
code block names a script that exists, options that its own parser accepts and config keys
that exist."""
from __future__ import annotations

import argparse
import re
import runpy
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)\)")
FENCE = re.compile(r"^```(\w*)\n(.*?)^```", re.MULTILINE | re.DOTALL)
SHELL_BLOCKS = {"", "bash", "sh", "shell", "console"}


def markdown_files() -> list[Path]:
    listed = subprocess.run(["git", "ls-files", "*.md"], cwd=REPO, capture_output=True, text=True).stdout.split()
    return [REPO / name for name in listed if (REPO / name).exists()]


def relative_links(md: Path) -> list[str]:
    text = FENCE.sub("", md.read_text())  # links inside code blocks are code, not links
    return [t for t in LINK.findall(text) if not re.match(r"[a-z][a-z0-9+.-]*:|#", t)]


def test_every_relative_link_resolves():
    broken = [f"{md.relative_to(REPO)}: {target}" for md in markdown_files() for target in relative_links(md)
              if not (md.parent / target.split("#")[0]).exists()]
    assert not broken, "broken links:\n" + "\n".join(broken)


# ---------------------------------------------------------------- commands in code blocks
def shell_commands(md: Path) -> list[str]:
    """Each simple command of the shell code blocks: continuations joined, comments dropped,
    split at ; && || and |."""
    commands = []
    for lang, body in FENCE.findall(md.read_text()):
        if lang not in SHELL_BLOCKS:
            continue
        body = re.sub(r"\\\n\s*", " ", body)
        for line in body.splitlines():
            line = line.split(" #")[0].strip()
            if line and not line.startswith("#"):
                commands += [c.strip() for c in re.split(r"\s*(?:;|&&|\|\||\|)\s*", line) if c.strip()]
    return commands


def invocation(command: str) -> tuple[str, list[str], list[str]] | None:
    """(what runs, its arguments, torchrun's own arguments) for a command of ours, else None.
    What runs is a script path, `shards SUBCOMMAND` or `imgcls-NAME`."""
    try:
        words = shlex.split(command)
    except ValueError:
        return None
    while words and ("=" in words[0] and not words[0].startswith("-") or words[0] in ("srun", "sudo", "exec")):
        words = words[1:]  # VAR=value prefixes and launchers that take the command as it is
    if not words:
        return None
    program = Path(words[0]).name
    if program.startswith("imgcls-"):
        if program == "imgcls-shards":
            return ("shards " + words[1], words[2:], []) if len(words) > 1 else None
        return f"jobs/{program.removeprefix('imgcls-')}.py", words[1:], []
    launcher_args = []
    if program == "torchrun":
        scripts = [i for i, w in enumerate(words) if w.endswith(".py")]
        if not scripts:
            return None
        launcher_args, words = words[1:scripts[0]], ["python", *words[scripts[0]:]]
        program = "python"
    if not re.fullmatch(r"python[\d.]*", program) or len(words) < 2:
        return None
    if words[1] == "-m" and len(words) > 3 and words[2] == "shards":
        return "shards " + words[3], words[4:], []
    if words[1].endswith(".py"):
        return words[1], words[2:], launcher_args
    return None


class _Captured(Exception):
    def __init__(self, parser: argparse.ArgumentParser):
        self.parser = parser


def script_parser(script: str) -> argparse.ArgumentParser:
    """The parser a script builds: `build_parser()` where it has one, else the one its main()
    parses with (caught at parse time, before the script does any work)."""
    if script.startswith("shards "):
        from shards.cli import parser
        sub = next(a for a in parser()._actions if isinstance(a, argparse._SubParsersAction))
        return sub.choices[script.split()[1]]
    path = REPO / script
    namespace = runpy.run_path(str(path), run_name="docs_check")
    if "build_parser" in namespace:
        return namespace["build_parser"]()

    def capture(self, *args, **kwargs):
        raise _Captured(self)
    original, argparse.ArgumentParser.parse_known_args = argparse.ArgumentParser.parse_known_args, capture
    try:
        namespace["main"]()
    except _Captured as caught:
        return caught.parser
    finally:
        argparse.ArgumentParser.parse_known_args = original
    raise AssertionError(f"{script}: found no argument parser")


def unknown_options(parser: argparse.ArgumentParser, args: list[str]) -> list[str]:
    known = set(parser._option_string_actions)
    return [a for a in args if a.startswith("-") and len(a) > 1 and not re.fullmatch(r"-\d.*", a)
            and a.split("=")[0] not in known]


OVERRIDE_TAKERS = {"jobs/train.py", "jobs/submit.py", "jobs/sweep.py"}


def unknown_config_keys(args: list[str]) -> list[str]:
    """The `key=value` overrides among args whose key the config tree lacks."""
    from imgcls.config import Config, ConfigError, apply_override, to_dict
    bad = []
    for arg in args:
        if re.fullmatch(r"[a-z_]+(\.[a-z_]+)+=.*", arg):
            try:
                apply_override(to_dict(Config()), arg.split("=")[0] + "=0")  # keys only: values are placeholders
            except ConfigError:
                bad.append(arg.split("=")[0])
    return bad


def documented_invocations() -> list[tuple[str, str, tuple]]:
    found = []
    for md in markdown_files():
        for command in shell_commands(md):
            call = invocation(command)
            if call:
                found.append((str(md.relative_to(REPO)), command, call))
    return found


def test_the_docs_show_commands():
    """The check below is not vacuous: the README's own tour is among what it reads."""
    scripts = {call[0] for _, _, call in documented_invocations()}
    assert {"jobs/train.py", "jobs/evaluate.py", "shards build"} <= scripts, scripts


def test_every_documented_command_names_a_script_and_options_it_accepts():
    sys.path.insert(0, str(REPO))
    parsers: dict[str, argparse.ArgumentParser] = {}
    problems = []
    for md, command, (script, args, launcher_args) in documented_invocations():
        if not script.startswith("shards ") and not (REPO / script).is_file():
            problems.append(f"{md}: `{command}`: no script {script}")
            continue
        bad = []
        if any(a.startswith("-") for a in args):  # a script shown without options needs no parser
            if script not in parsers:
                parsers[script] = script_parser(script)
            bad = unknown_options(parsers[script], args)
        if launcher_args:
            from torch.distributed.run import get_args_parser
            bad += unknown_options(get_args_parser(), launcher_args)
        if script in OVERRIDE_TAKERS:
            bad += unknown_config_keys(args)
        if bad:
            problems.append(f"{md}: `{command}`: {script} accepts no {', '.join(bad)}")
    assert not problems, "\n".join(problems)


@pytest.mark.parametrize("command, expected", [
    (".venv/bin/python jobs/train.py --config x.yaml a.b=1", ("jobs/train.py", ["--config", "x.yaml", "a.b=1"], [])),
    ("OMP_NUM_THREADS=1 torchrun --nproc-per-node 2 jobs/train.py --bogus",
     ("jobs/train.py", ["--bogus"], ["--nproc-per-node", "2"])),
    ("python -m shards build src dest --workers 4", ("shards build", ["src", "dest", "--workers", "4"], [])),
    ("imgcls-evaluate ckpt --split test", ("jobs/evaluate.py", ["ckpt", "--split", "test"], [])),
    ("pip install -e .", None),
])
def test_commands_are_read_as_a_shell_reads_them(command, expected):
    assert invocation(command) == expected


def test_an_unknown_option_is_found():
    sys.path.insert(0, str(REPO))
    assert unknown_options(script_parser("jobs/train.py"), ["--config", "x", "--no-such-option=1"]) == \
        ["--no-such-option=1"]
    assert unknown_options(script_parser("shards build"), ["--workers", "2", "--wrokers"]) == ["--wrokers"]
    assert unknown_config_keys(["optim.lr=0.1", "optim.lrr=0.1", "run.dir=x"]) == ["optim.lrr"]
