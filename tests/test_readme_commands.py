"""Every ``fedkin`` command shown in README.md code blocks runs as documented.

Commands are taken from fenced ```bash/sh/console blocks (also indented ones inside list items)
and from indented ``$ fedkin …`` examples; ``.venv/bin/fedkin`` and ``fedkin`` are the same
entry point. A block is one test, run like a shell script: its ``fedkin`` commands in order,
``cd DIR`` honoured, other programs (``bash scripts/setup.sh``) left out. Each command runs in a
subprocess (the installed console script) in a scratch directory that links the repository's
top-level entries (a directory the block ``cd``s into is copied first), so relative paths
resolve, later commands see earlier outputs (``--resume runs/x``) and nothing is written into
the repository. Only what bounds the runtime is changed:

* ``fedkin run``/``compare``: ``rounds`` capped at :data:`MAX_ROUNDS` (appended if absent,
  except with ``--resume``), ``--seeds`` capped at 1, ``--quiet`` added;
* ``fedkin bench NAME``: its documented options are replaced by :data:`BENCH_SMALL` ``[NAME]``,
  or the command is skipped for the reason :data:`BENCH_SKIPPED` ``[NAME]`` gives;
* ``fedkin flower …`` is skipped: ``tests/test_readme_deploy.py`` runs the deployment section
  with the Flower processes it needs.

A ``$ command`` followed by output lines is checked against them: a documented error
(``fedkin: error: …``) must exit 2 with that message (``...`` stands for any text); other
documented output must appear in stdout when the command ran unchanged.
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
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
    "privacy": ["--quick", "--out", "bench-privacy"],
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
class Step:
    """``cd DIR`` (``argv = ("cd", DIR)``) or a fedkin command (``argv`` after the executable),
    with the output lines the README shows after it."""

    argv: tuple[str, ...]
    output: tuple[str, ...]
    line: int
    cd: bool = False


@dataclass(frozen=True)
class Block:
    steps: tuple[Step, ...]

    @property
    def id(self) -> str:
        first = next(s for s in self.steps if not s.cd)
        return f"L{first.line}:" + " ".join(first.argv)[:60]


def _segments(tokens: list[str]) -> list[list[str]]:
    """Split a shell token list at ``&&``, ``||``, ``;`` and ``|``."""
    out: list[list[str]] = [[]]
    for t in tokens:
        if t in ("&&", "||", ";", "|"):
            out.append([])
        else:
            out[-1].append(t)
    return [s for s in out if s]


def _block_steps(lines: list[tuple[int, str]]) -> list[Step]:
    """Steps of one shell block of ``(line number, text)``. In a block with ``$ `` prompts only
    prompt lines are commands and the lines after one are its output; otherwise every line is a
    command. A trailing backslash continues a line."""
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
    steps = []
    for number, text, output in entries:
        for seg in _segments(shlex.split(text, comments=True)):
            if seg[0] == "cd" and len(seg) == 2:
                steps.append(Step((seg[1],), (), number, cd=True))
            elif seg[0] == "fedkin" or seg[0].endswith("/fedkin"):
                steps.append(Step(tuple(seg[1:]), tuple(output), number))
    return steps


def readme_blocks(text: str) -> list[Block]:
    """Every code block of a README that shows a fedkin command, in order."""
    lines = text.splitlines()
    blocks: list[list[Step]] = []
    i = 0
    while i < len(lines):
        fence = re.match(r"^\s*```(\w*)\s*$", lines[i])
        if fence:
            body = []
            i += 1
            while i < len(lines) and lines[i].strip() != "```":
                body.append((i + 1, lines[i]))
                i += 1
            if fence.group(1) in SHELL_LANGUAGES:
                blocks.append(_block_steps(body))
            i += 1
            continue
        if re.match(r"^ {4}\$ ", lines[i]):  # an indented console example and its output
            body = []
            while i < len(lines) and lines[i].startswith("    ") and lines[i].strip():
                body.append((i + 1, lines[i]))
                i += 1
            blocks.append(_block_steps(body))
            continue
        i += 1
    return [Block(tuple(b)) for b in blocks if any(not s.cd for s in b)]


BLOCKS = readme_blocks(README.read_text())


def test_readme_shows_commands():
    """The parser finds the README's commands (guards against silently testing nothing)."""
    steps = [s for b in BLOCKS for s in b.steps if not s.cd]
    assert len(steps) >= 5
    assert any(s.output and s.output[0].startswith("fedkin: error:") for s in steps)


def test_parser_reads_prompts_outputs_continuations_and_cd():
    text = "\n".join(
        [
            "```bash",
            "bash setup.sh && .venv/bin/fedkin run a=1 \\",
            "    b=2   # comment",
            "cd examples && fedkin list",
            "```",
            "",
            "    $ fedkin run x=0",
            "    fedkin: error: bad ... value",
            "    $ fedkin list",
        ]
    )
    first, second = readme_blocks(text)
    assert [(s.argv, s.cd) for s in first.steps] == [
        (("run", "a=1", "b=2"), False),
        (("examples",), True),
        (("list",), False),
    ]
    assert [(s.argv, s.output) for s in second.steps] == [
        (("run", "x=0"), ("fedkin: error: bad ... value",)),
        (("list",), ()),
    ]
    assert _matches("fedkin: error: bad ... value", "fedkin: error: bad key: value (got 0)")
    assert not _matches("fedkin: error: bad ... value", "fedkin: error: bad key")
    assert not _matches("fedkin: error: bad", "Traceback: fedkin: error: bad")


def _capped(argv: list[str]) -> list[str] | str:
    """``argv`` with the runtime bounded (see the module docstring), or why it is not run."""
    sub = argv[0]
    if sub == "bench":
        name = argv[1]
        if name in BENCH_SKIPPED:
            return f"fedkin bench {name}: {BENCH_SKIPPED[name]}"
        if name not in BENCH_SMALL:
            pytest.fail(
                f"fedkin bench {name}: add its smallest options to BENCH_SMALL or a "
                "reason to BENCH_SKIPPED in tests/test_readme_commands.py"
            )
        return ["bench", name, *BENCH_SMALL[name]]
    if sub == "flower":
        return (
            f"fedkin flower {argv[1]}: the deployment section (with the SuperLink and "
            "SuperNodes it prints) is run by tests/test_readme_deploy.py"
        )
    if sub not in ("run", "compare"):
        return argv
    out = []
    for j, token in enumerate(argv):
        if j and argv[j - 1] == "--seeds":
            token = str(min(int(token), 1))
        elif token.startswith("rounds="):
            token = f"rounds={min(int(token.split('=', 1)[1]), MAX_ROUNDS)}"
        out.append(token)
    if "--resume" not in out and not any(t.startswith("rounds=") for t in out):
        out.append(f"rounds={MAX_ROUNDS}")
    return out if "--quiet" in out else [*out, "--quiet"]


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


def _enter(cwd: Path, target: str) -> Path:
    """``cd target``; a linked repository directory is replaced by a copy first."""
    path = cwd / target
    if path.is_symlink():
        source = path.resolve()
        path.unlink()
        shutil.copytree(source, path, symlinks=True, ignore=shutil.ignore_patterns("runs"))
    assert path.is_dir(), f"cd {target}: no such directory"
    return path


def _matches(expected: str, line: str) -> bool:
    """``line`` starts with ``expected``, where ``...`` in ``expected`` stands for any text."""
    parts = [p.strip() for p in expected.split("...")]
    if not line.startswith(parts[0]):
        return False
    at = len(parts[0])
    for part in parts[1:]:
        at = line.find(part, at)
        if at < 0:
            return False
        at += len(part)
    return True


@pytest.mark.slow
@pytest.mark.parametrize("block", BLOCKS, ids=[b.id for b in BLOCKS])
def test_readme_block_runs_as_documented(block: Block, tmp_path):
    cwd = _scratch(tmp_path)
    path = [str(REPO / "src"), *filter(None, [os.environ.get("PYTHONPATH")])]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(path)}
    skipped = []
    for step in block.steps:
        if step.cd:
            cwd = _enter(cwd, step.argv[0])
            continue
        argv = _capped(list(step.argv))
        if isinstance(argv, str):
            skipped.append(argv)
            continue
        proc = subprocess.run(
            [*_fedkin(), *argv], cwd=cwd, env=env, capture_output=True, text=True, timeout=900
        )
        shown = f"$ fedkin {' '.join(argv)}\n{proc.stdout[-2000:]}\n{proc.stderr[-2000:]}"
        if step.output and step.output[0].startswith("fedkin: error:"):
            assert proc.returncode == 2, shown
            assert _matches(step.output[0], proc.stderr.strip().splitlines()[-1]), shown
            continue
        assert proc.returncode == 0, shown
        if argv == list(step.argv):
            for line in step.output:
                printed = [out.strip() for out in proc.stdout.splitlines()]
                assert any(_matches(line, out) for out in printed), (line, shown)
    if skipped and len(skipped) == sum(not s.cd for s in block.steps):
        pytest.skip("; ".join(skipped))
