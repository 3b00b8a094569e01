"""README.md and docs/*.md say only what exists: every relative link resolves (to a file, and to a
heading where it names one), and every command they show — ``ovdense <subcommand> …`` and
``python tools/….py …`` (or ``demo/….py``), in code blocks and in inline code — names a subcommand or
script that exists and only options that its ``--help`` lists. Each ``--help`` runs once, in a
subprocess, and is cached for the session."""

from __future__ import annotations

import functools
import os
import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]

FENCE = re.compile(r"^(\s*)(```|~~~)(.*)$")
LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)")
INLINE_CODE = re.compile(r"`([^`]+)`")
OPTION = re.compile(r"(?<![\w-])--[A-Za-z][\w-]*")
SHELL_LANGUAGES = {"", "bash", "sh", "shell", "console"}
# ``python tools/x.py``, ``torchrun [its options] tools/x.py``, with optional ``VAR=value`` before
SCRIPT = re.compile(r"^(?:[A-Z_]+=\S+\s+)*"
                    r"(?:python3?|torchrun(?:\s+--?\S+(?:\s+(?!tools/|demo/)[^-\s]\S*)?)*)"
                    r"\s+((?:tools|demo)/\S+\.py)\b(.*)$")
SUBCOMMAND = re.compile(r"^(?:[A-Z_]+=\S+\s+)*(?:ovdense|python3? -m ovdense)(?:\s+(.*))?$")


@dataclass(frozen=True)
class Command:
    page: str
    line: int
    text: str


def _read(page: Path) -> list[str]:
    return page.read_text(encoding="utf-8").splitlines()


def _split_blocks(lines: list[str]):
    """Yield ``(kind, language, start line, lines)`` for the fenced code blocks and the prose between."""
    prose: list[str] = []
    start, i = 1, 0
    while i < len(lines):
        m = FENCE.match(lines[i])
        if not m:
            prose.append(lines[i])
            i += 1
            continue
        yield "prose", "", start, prose
        fence, language, body, begin = m.group(2), m.group(3).strip().lower(), [], i + 2
        i += 1
        while i < len(lines) and not lines[i].strip().startswith(fence):
            body.append(lines[i])
            i += 1
        yield "code", language, begin, body
        i += 1
        prose, start = [], i + 1
    yield "prose", "", start, prose


def _strip_comment(line: str) -> str:
    """Drop a shell comment: a ``#`` at the start or after a space, outside quotes."""
    quote = None
    for j, ch in enumerate(line):
        if quote:
            if ch == quote:
                quote = None
        elif ch in "\"'":
            quote = ch
        elif ch == "#" and (j == 0 or line[j - 1].isspace()):
            return line[:j]
    return line


def _logical_lines(body: list[str], first: int):
    """Join ``\\`` continuations, and the indented ``[--option …]`` lines of a usage synopsis."""
    current, at = "", first
    for k, raw in enumerate(body):
        line = _strip_comment(raw).rstrip()
        stripped = line.strip()
        if current and (current.endswith("\\") or stripped.startswith(("[", "--"))
                        and raw[:1].isspace()):
            current = current.rstrip("\\").rstrip() + " " + stripped
            continue
        if current:
            yield at, current
        current, at = line, first + k
    if current:
        yield at, current


def _shell_commands(text: str):
    for part in re.split(r"&&|;", text):
        part = part.strip().removeprefix("$ ").strip()
        if part:
            yield part


def collect() -> tuple[list[tuple[str, int, str]], list[Command]]:
    """Every relative link ``(page, line, target)`` and every command shown, over all pages."""
    links, commands = [], []
    for page in PAGES:
        name = page.relative_to(ROOT).as_posix()
        for kind, language, start, body in _split_blocks(_read(page)):
            if kind == "code":
                if language in SHELL_LANGUAGES:
                    for at, line in _logical_lines(body, start):
                        commands += [Command(name, at, c) for c in _shell_commands(line)]
                continue
            # prose: links and inline code; an inline span may run over a line break
            text = "\n".join(body)
            for m in LINK.finditer(INLINE_CODE.sub("", text)):
                target = m.group(1)
                if not re.match(r"^[a-z][a-z+.-]*:", target):  # http:, https:, mailto:
                    line = start + text[: text.find(m.group(0))].count("\n")
                    links.append((name, line, target))
            for m in INLINE_CODE.finditer(text):
                span = " ".join(m.group(1).split())
                line = start + text[: m.start()].count("\n")
                if SUBCOMMAND.match(span) or SCRIPT.match(span):
                    commands.append(Command(name, line, span))
    return links, commands


LINKS, COMMANDS = collect()


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to hyphens."""
    text = re.sub(r"`|\*\*|\*|_(?=\W)|(?<=\W)_", "", heading.strip().lower())
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", text)
    return re.sub(r"[^\w\- ]", "", text).replace(" ", "-")


@functools.cache
def anchors(page: Path) -> frozenset[str]:
    seen: dict[str, int] = {}
    out = set()
    for kind, _, _, body in _split_blocks(_read(page)):
        if kind != "prose":
            continue
        for line in body:
            m = re.match(r"^#{1,6}\s+(.*?)\s*#*\s*$", line)
            if m:
                base = slug(m.group(1))
                n = seen.get(base, 0)
                seen[base] = n + 1
                out.add(base if n == 0 else f"{base}-{n}")
    return frozenset(out)


def test_pages_exist():
    assert (ROOT / "docs" / "index.md").is_file()
    assert len(_read(ROOT / "README.md")) <= 300, "README.md is the entrance: at most 300 lines"
    assert LINKS and COMMANDS


@pytest.mark.parametrize("page, line, target", LINKS, ids=[f"{p}:{n}:{t}" for p, n, t in LINKS])
def test_relative_link_resolves(page, line, target):
    path, _, anchor = target.partition("#")
    source = ROOT / page
    resolved = (source.parent / path).resolve() if path else source
    assert resolved.exists(), f"{page}:{line}: the link {target!r} points at {resolved}, which does not exist"
    if anchor and resolved.suffix == ".md":
        assert anchor in anchors(resolved), (
            f"{page}:{line}: the link {target!r} names the heading #{anchor}, which "
            f"{resolved.relative_to(ROOT)} does not have (it has: {', '.join(sorted(anchors(resolved)))})")


# the ``ovdense`` console script is ``ovdense.cli:main``; run it from this checkout, not an installed copy
CLI_MAIN = ("-c", "import sys; from ovdense.cli import main; sys.argv[0] = 'ovdense'; sys.exit(main())")


def _help(argv: tuple[str, ...]) -> subprocess.CompletedProcess:
    path = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))
    env = dict(os.environ, PYTHONPATH=path, OMP_NUM_THREADS="1", COLUMNS="200")
    return subprocess.run([sys.executable, *argv, "--help"], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=300)


def help_options(text: str) -> set[str]:
    """The options an argparse ``--help`` lists: those that begin a line of its option sections
    (not the ones its description or an option's help text merely mention)."""
    lines = text.splitlines()
    start = next((i for i, line in enumerate(lines) if re.match(r"^(options|optional arguments):", line)),
                 None)
    assert start is not None, f"not an argparse --help:\n{text}"
    found = set()
    for line in lines[start:]:
        stripped = line.strip()
        if stripped.startswith("-"):
            found.update(OPTION.findall(re.split(r"\s{2,}", stripped)[0]))
    return found


@functools.cache
def subcommands() -> dict[str, str]:
    """Each subcommand of the ``ovdense`` command and the text of its ``--help``."""
    top = _help(CLI_MAIN)
    assert top.returncode == 0, top.stderr
    m = re.search(r"\{([\w,-]+)\}", top.stdout)
    assert m, top.stdout
    out = {"": top.stdout}
    for name in m.group(1).split(","):
        sub = _help((*CLI_MAIN, name))
        assert sub.returncode == 0, f"ovdense {name} --help failed:\n{sub.stderr}"
        out[name] = sub.stdout
    return out


# the importable names of setup.py's extras: a script whose --help needs one of them is skipped
# where it is not installed; any other missing module is a broken script and fails
OPTIONAL = {"mmengine", "mmseg", "mmdet", "mmcv", "segment_anything", "pycocotools", "scipy", "sklearn",
            "prettytable", "gradio", "gradio_client", "anomalib", "playwright", "triton", "lvis"}


@functools.cache
def script_help(script: str) -> str:
    done = _help((script,))
    if done.returncode != 0:
        missing = re.search(r"No module named '([\w.]+)'", done.stderr)
        if missing and missing.group(1).split(".")[0] in OPTIONAL:
            pytest.skip(f"{script} --help needs the package {missing.group(1)}, which is not installed")
        pytest.fail(f"python {script} --help failed (exit {done.returncode}):\n{done.stderr[-2000:]}")
    return done.stdout


def _by(key) -> dict[str, list[Command]]:
    out: dict[str, list[Command]] = {}
    for c in COMMANDS:
        k = key(c)
        if k is not None:
            out.setdefault(k, []).append(c)
    return out


def _subcommand_of(c: Command) -> str | None:
    m = SUBCOMMAND.match(c.text)
    if not m:
        return None
    rest = (m.group(1) or "").split()
    return rest[0] if rest and not rest[0].startswith("-") else ""


def _script_of(c: Command) -> str | None:
    m = SCRIPT.match(c.text)
    return m.group(1) if m else None


CLI = _by(_subcommand_of)
SCRIPTS = _by(_script_of)


def unknown_options(commands: list[Command], listed: set[str], after) -> list[str]:
    bad = []
    for c in commands:
        used = set(OPTION.findall(after(c)))
        missing = sorted(used - listed - {"--help"})
        if missing:
            bad.append(f"{c.page}:{c.line}: {' '.join(missing)} not in --help of: {c.text}")
    return bad


@pytest.mark.parametrize("name", sorted(CLI), ids=lambda n: n or "ovdense")
def test_cli_commands_exist(name):
    helps = subcommands()
    commands = CLI[name]
    assert name in helps, (
        f"'ovdense {name}' is not a subcommand (there are: {', '.join(sorted(k for k in helps if k))}); "
        f"shown at " + ", ".join(f"{c.page}:{c.line}" for c in commands))

    def after(c: Command) -> str:
        return SUBCOMMAND.match(c.text).group(1) or ""

    bad = unknown_options(commands, help_options(helps[name]), after)
    assert not bad, "options the docs show that do not exist:\n" + "\n".join(bad)


@pytest.mark.parametrize("script", sorted(SCRIPTS))
def test_script_commands_exist(script):
    commands = SCRIPTS[script]
    assert (ROOT / script).is_file(), (
        f"{script} does not exist; shown at " + ", ".join(f"{c.page}:{c.line}" for c in commands))
    listed = help_options(script_help(script))
    bad = unknown_options(commands, listed, lambda c: SCRIPT.match(c.text).group(2))
    assert not bad, "options the docs show that do not exist:\n" + "\n".join(bad)


def test_the_check_sees_a_wrong_option():
    """The checker itself: a made-up option of a real subcommand is reported with its page and line."""
    fake = [Command("README.md", 1, "ovdense segment img.png --classes a,b --no-such-option")]
    listed = help_options(subcommands()["segment"])
    bad = unknown_options(fake, listed, lambda c: SUBCOMMAND.match(c.text).group(1))
    assert bad == ["README.md:1: --no-such-option not in --help of: " + fake[0].text]
