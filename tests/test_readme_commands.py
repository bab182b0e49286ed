"""Every ``fedkin`` command shown in README.md code blocks runs as documented.

Commands are taken from fenced ```bash/sh/console blocks (also indented ones inside list items)
and from indented ``$ fedkin …`` examples; ``.venv/bin/fedkin`` and ``fedkin`` are the same
entry point. Each runs in a subprocess (the installed console script) in a scratch directory
that links the repository's top-level files, so relative paths in commands resolve and nothing
is written into the repository. Only what bounds the runtime is changed:

* ``fedkin run``/``compare``: ``rounds`` capped at :data:`MAX_ROUNDS` (appended if absent),
  ``--seeds`` capped at 1, ``--out`` into the scratch directory, ``--quiet``;
* ``fedkin bench NAME``: its documented options are replaced by :data:`BENCH_SMALL` ``[NAME]``,
  or the command is skipped for the reason :data:`BENCH_SKIPPED` ``[NAME]`` gives.

A ``$ command`` followed by output lines is checked against them: documented errors
(``fedkin: error: …``) must exit 2 with that message (text up to a trailing ``...``);
other documented output must appear in stdout when the command ran unchanged.
"""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
README = REPO / "README.md"
MAX_ROUNDS = 1
SHELL_LANGUAGES = {"bash", "sh", "shell", "console", ""}

#: smallest options of each benchmark, used instead of the documented ones
BENCH_SMALL: dict[str, list[str]] = {
    "throughput": ["--clients", "10", "--rounds", "1", "--loop-cap", "10"],
    "privacy": ["--quick"],
    "estimation": ["--clients", "50", "--reps", "1", "--no-plots"],
}
#: benchmarks not run here, and why
BENCH_SKIPPED: dict[str, str] = {
    "scale": "builds populations of up to 1,000,000 clients (minutes); "
    "tests/test_scale.py runs a small one",
    "peers": "starts Flower's simulation runtime and torch.compile (minutes); "
    "tests/test_peers.py runs a small one",
}


@dataclass(frozen=True)
class Documented:
    """One command as the README shows it, and the output lines shown after it (if any)."""

    argv: tuple[str, ...]  # after the ``fedkin`` executable
    output: tuple[str, ...]
    line: int

    @property
    def id(self) -> str:
        return f"L{self.line}:" + " ".join(self.argv)[:60]


def _segments(tokens: list[str]) -> list[list[str]]:
    """Split a shell token list at ``&&``, ``||``, ``;`` and ``|``."""
    out: list[list[str]] = [[]]
    for t in tokens:
        if t in ("&&", "||", ";", "|"):
            out.append([])
        else:
            out[-1].append(t)
    return [s for s in out if s]


def _block_commands(lines: list[tuple[int, str]]) -> list[Documented]:
    """Fedkin commands of one shell block of ``(line number, text)``. In a block with ``$ ``
    prompts only prompt lines are commands and the lines after one are its output; otherwise
    every line is a command. Trailing ``\\`` continues a line."""
    prompts = any(text.strip().startswith("$ ") for _, text in lines)
    entries: list[tuple[int, str, list[str]]] = []  # (first line, command text, output)
    pending: tuple[int, str] | None = None
    for number, raw in lines:
        text = raw.strip()
        if pending is None and prompts and not text.startswith("$ "):
            if entries and text:
                entries[-1][2].append(text)
            continue
        start, head = pending or (number, "")
        text = head + text.removeprefix("$ ")
        if text.endswith("\\"):
            pending = (start, text[:-1] + " ")
            continue
        pending = None
        entries.append((start, text, []))
    found = []
    for number, text, output in entries:
        for seg in _segments(shlex.split(text, comments=True)):
            if seg[0] == "fedkin" or seg[0].endswith("/fedkin"):
                found.append(Documented(tuple(seg[1:]), tuple(output), number))
    return found


def readme_commands(text: str) -> list[Documented]:
    """Every documented fedkin command of a README, in order."""
    lines = text.splitlines()
    commands: list[Documented] = []
    i = 0
    while i < len(lines):
        fence = re.match(r"^(\s*)```(\w*)\s*$", lines[i])
        if fence:
            language = fence.group(2)
            body = []
            i += 1
            while i < len(lines) and lines[i].strip() != "```":
                body.append((i + 1, lines[i]))
                i += 1
            if language in SHELL_LANGUAGES:
                commands += _block_commands(body)
            i += 1
            continue
        if re.match(r"^ {4}\$ ", lines[i]):  # an indented console example and its output
            block = []
            while i < len(lines) and lines[i].startswith("    ") and lines[i].strip():
                block.append((i + 1, lines[i]))
                i += 1
            commands += _block_commands(block)
            continue
        i += 1
    return commands


COMMANDS = readme_commands(README.read_text())


def test_readme_shows_commands():
    """The parser finds the README's commands (guards against silently testing nothing)."""
    assert len(COMMANDS) >= 5
    assert any(c.output and c.output[0].startswith("fedkin: error:") for c in COMMANDS)


def _capped(argv: list[str], scratch: Path) -> list[str]:
    """``argv`` with the runtime bounded (see the module docstring)."""
    sub = argv[0]
    if sub == "bench":
        name = argv[1]
        if name in BENCH_SKIPPED:
            pytest.skip(f"fedkin bench {name}: {BENCH_SKIPPED[name]}")
        if name not in BENCH_SMALL:
            pytest.fail(
                f"fedkin bench {name}: add its smallest options to BENCH_SMALL or a "
                "reason to BENCH_SKIPPED in tests/test_readme_commands.py"
            )
        out = ["bench", name, *BENCH_SMALL[name]]
        return out + (["--out", str(scratch / "bench")] if name == "privacy" else [])
    if sub not in ("run", "compare"):
        return argv
    out, skip = [], False
    for j, token in enumerate(argv):
        if skip:
            skip = False
            continue
        if token in ("--out", "--seeds"):
            skip = True
            if token == "--seeds":
                out += ["--seeds", str(min(int(argv[j + 1]), 1))]
            continue
        if token.startswith("rounds="):
            token = f"rounds={min(int(token.split('=', 1)[1]), MAX_ROUNDS)}"
        out.append(token)
    if "--resume" not in out and not any(t.startswith("rounds=") for t in out):
        out.append(f"rounds={MAX_ROUNDS}")
    return [*out, "--out", str(scratch / "out"), "--quiet"]


def _fedkin() -> list[str]:
    script = Path(sys.executable).with_name("fedkin")
    if script.exists():
        return [str(script)]
    return [sys.executable, "-c", "import sys; from fedkin.cli.main import main; sys.exit(main())"]


def _scratch(tmp_path: Path) -> Path:
    """A working directory that sees the repository's files but writes elsewhere."""
    for entry in REPO.iterdir():
        if entry.name not in (".git", "runs"):
            (tmp_path / entry.name).symlink_to(entry)
    return tmp_path


@pytest.mark.slow
@pytest.mark.parametrize("command", COMMANDS, ids=[c.id for c in COMMANDS])
def test_readme_command_runs_as_documented(command: Documented, tmp_path):
    scratch = _scratch(tmp_path)
    argv = _capped(list(command.argv), scratch)
    path = [str(REPO / "src"), *filter(None, [os.environ.get("PYTHONPATH")])]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(path)}
    proc = subprocess.run(
        [*_fedkin(), *argv], cwd=scratch, env=env, capture_output=True, text=True, timeout=600
    )
    shown = f"$ fedkin {' '.join(argv)}\n{proc.stdout[-2000:]}\n{proc.stderr[-2000:]}"
    if command.output and command.output[0].startswith("fedkin: error:"):
        expected = command.output[0].removesuffix("...").rstrip()
        assert proc.returncode == 2, shown
        assert proc.stderr.strip().splitlines()[-1].startswith(expected), shown
        return
    assert proc.returncode == 0, shown
    if argv == list(command.argv):
        for line in command.output:
            assert line.removesuffix("...").rstrip() in proc.stdout, (line, shown)
