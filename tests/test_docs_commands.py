"""Every ``certonnx`` command in README.md and docs/*.md parses with the real CLI and names files that exist.

Documentation that shows a flag the CLI no longer has, a choice it does not accept, an unquoted
``>=`` that the shell would turn into a redirection, or a placeholder file (``model.onnx``) sends
a new user into an error on their first try. So each command line of a fenced code block is
taken as the shell would (``\\`` continuations joined, ``#`` comments and ``||``/``&&``/``;``
separators handled), parsed by the click command of :mod:`certonnx.cli` (type conversion and
the callbacks that parse norms and requirements included, nothing run), and every file it reads
must exist in the repository or be written by an earlier command of the same page.

A usage synopsis (a line with ``[...]`` groups, such as ``certonnx verify MODEL PROP.vnnlib
[--timeout S]``) is not a command: only the flags it names are checked against the command.
"""

from __future__ import annotations

import re
import shlex
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import click
import pytest

from certonnx.cli import cli

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]

#: parameters (click destination names) holding files a command reads; ``--data`` may be X.npy,Y.npy
INPUTS = ("model", "prop", "data")
#: parameters holding files or folders a command writes, which later commands may read
OUTPUTS = ("output", "json_out", "plot", "log_json", "checkpoint_dir", "results_file")
#: flags of other documented programs (example scripts, tools) that name a folder they write
OTHER_OUTPUT_FLAGS = ("--out-dir", "--out", "-o")
SEPARATORS = {"||", "&&", ";", "|", "&"}
REDIRECTS = {">", ">>", "<", ">&", "<&"}
#: fence languages whose lines are not shell commands
NOT_SHELL = {"python", "py", "pycon", "json", "toml"}


@dataclass
class Line:
    """One logical shell line of a code block (continuations joined) and where it starts."""

    page: Path
    lineno: int
    text: str

    @property
    def where(self) -> str:
        return f"{self.page.relative_to(ROOT)}:{self.lineno}"


@dataclass
class Page:
    """A page's command lines in order, and the text of its code blocks (for files that a
    Python snippet of the page writes)."""

    path: Path
    lines: list[Line] = field(default_factory=list)
    code: list[tuple[int, str]] = field(default_factory=list)  # (first line number, block text)


def read_page(path: Path) -> Page:
    """Split a Markdown page into fenced code blocks and their logical lines."""
    page = Page(path)
    block: list[tuple[int, str]] | None = None
    lang = ""
    for no, raw in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if raw.lstrip().startswith("```"):
            if block is None:
                block, lang = [], raw.strip().removeprefix("```").strip().lower()
            else:
                if block:
                    page.code.append((block[0][0], "\n".join(t for _, t in block)))
                if lang not in NOT_SHELL:
                    page.lines.extend(_logical_lines(path, block))
                block = None
            continue
        if block is not None:
            block.append((no, raw))
    return page


def _logical_lines(path: Path, block: list[tuple[int, str]]) -> Iterator[Line]:
    """Join ``\\``-continued lines; a synopsis also takes the indented lines that follow it."""
    cur: Line | None = None
    synopsis = False
    for no, raw in block:
        if cur is not None and (cur.text.endswith("\\") or (synopsis and raw[:1].isspace() and raw.strip())):
            cur.text = cur.text.removesuffix("\\") + " " + raw.strip()
            continue
        if cur is not None:
            yield cur
        # a YAML CI step (``- run: certonnx ...``, ``- certonnx ...``) holds a shell line
        cur = Line(path, no, re.sub(r"^(-\s+)?(run:\s+)?", "", raw.strip()))
        synopsis = _is_synopsis(cur.text)
    if cur is not None:
        yield cur


def _is_synopsis(text: str) -> bool:
    """A certonnx usage line: ``[...]`` groups outside quotes (``[--json]``, ``[options]``)."""
    unquoted = re.sub(r"'[^']*'|\"[^\"]*\"", "", text)
    return bool(re.search(r"(^|\s)\[", unquoted)) and certonnx_args(unquoted.split()) is not None


def shell_words(text: str) -> list[str]:
    """Words as a POSIX shell splits them, with operators (``||``, ``>``) as words of their own
    and ``# comments`` dropped."""
    lex = shlex.shlex(text, posix=True, punctuation_chars=True)
    lex.whitespace_split = True
    lex.commenters = "#"
    return list(lex)


def certonnx_args(words: list[str]) -> list[str] | None:
    """The arguments after the program when ``words`` run certonnx (``certonnx``,
    ``.venv/bin/certonnx``, ``python -m certonnx``, ``torchrun ... -m certonnx``), else None."""
    while words and (words[0] == "$" or re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*=\S*", words[0])):
        words = words[1:]  # a prompt, environment assignments
    if not words:
        return None
    prog = Path(words[0]).name
    if prog == "certonnx":
        return words[1:]
    if re.fullmatch(r"python[0-9.]*|torchrun", prog) and "-m" in words:
        i = words.index("-m")
        if i + 1 < len(words) and words[i + 1] == "certonnx":
            return words[i + 2:]
    return None


def commands(line: Line) -> Iterator[list[str]]:
    """The simple commands of one shell line (split at ``||``, ``&&``, ``;``, ``|``); none for a
    line that is not shell (YAML keys, prose in a text block), unless it starts with certonnx."""
    try:
        words = shell_words(line.text)
    except ValueError as e:  # unbalanced quotes
        assert certonnx_args(line.text.split()) is None, f"{line.where}: {e}: {line.text!r}"
        return
    cur: list[str] = []
    for w in words:
        if w in SEPARATORS:
            if cur:
                yield cur
            cur = []
        else:
            cur.append(w)
    if cur:
        yield cur


@dataclass
class Parsed:
    """A documented certonnx command after click parsed it."""

    line: Line
    args: list[str]
    name: str
    params: dict[str, Any]


def parse(line: Line, args: list[str]) -> Parsed:
    """Parse ``args`` as ``certonnx`` would, up to the point where the command would start.

    Options before the command name (``certonnx --debug certify ...``) are the group's."""
    n_group = next((i for i, a in enumerate(args) if not a.startswith("-")), len(args))
    assert n_group < len(args), f"{line.where}: no command name in {line.text!r}"
    name, sub = args[n_group], args[n_group + 1:]
    with cli.make_context("certonnx", [*args[:n_group], name]) as ctx:
        cmd = cli.get_command(ctx, name)
        assert cmd is not None, f"{line.where}: certonnx has no command {name!r}: {line.text!r}"
        try:
            with cmd.make_context(name, list(sub), parent=ctx) as sctx:
                return Parsed(line, args, name, dict(sctx.params))
        except click.exceptions.Exit as e:  # --help: parsed fine
            assert e.exit_code == 0, f"{line.where}: {line.text!r} exits {e.exit_code}"
            return Parsed(line, args, name, {})
        except click.ClickException as e:
            raise AssertionError(f"{line.where}: `certonnx {name}` refuses it ({type(e).__name__}: "
                                 f"{e.format_message()}): {line.text!r}") from None


def check_method_options(parsed: Parsed) -> None:
    """``finetune``'s ``--method-opt KEY=VALUE`` and method flags, converted and checked by the
    method's ``Options`` as the command does before training (a key the method lacks fails)."""
    from certonnx.commands.options import method_options, pop_method_flags
    from certonnx.errors import CertonnxError
    from certonnx.train.methods import method_class

    if parsed.name != "finetune" or not parsed.params:
        return
    params = dict(parsed.params)
    try:
        opts = method_options(params["method"], pop_method_flags(params), params["method_opts"])
        method_class(params["method"]).parse_options(opts)
    except (CertonnxError, click.ClickException) as e:
        raise AssertionError(f"{parsed.line.where}: bad method option for --method {params['method']} "
                             f"({type(e).__name__}: {e}): {parsed.line.text!r}") from None


def strip_redirects(line: Line, words: list[str]) -> tuple[list[str], list[str]]:
    """``words`` without shell redirections, and the files they write. A redirection whose
    target starts with ``=`` is an unquoted ``>=`` (``--require linf:0.1>=0.9`` writes a file
    ``=0.9``): refused."""
    kept: list[str] = []
    written: list[str] = []
    it = iter(words)
    for w in it:
        if w not in REDIRECTS:
            kept.append(w)
            continue
        target = next(it, "")
        assert not target.startswith("="), (
            f"{line.where}: unquoted {w + target!r} is a shell redirection; quote the argument, "
            f"e.g. --require 'linf:0.1>=0.90': {line.text!r}")
        if w.startswith(">"):
            written.append(target)
    return kept, written


def _documented_lines() -> list[tuple[Page, Line]]:
    out: list[tuple[Page, Line]] = []
    for path in PAGES:
        page = read_page(path)
        out.extend((page, ln) for ln in page.lines)
    return out


ALL = _documented_lines()
COMMAND_LINES = [(p, ln) for p, ln in ALL if not _is_synopsis(ln.text) and any(
    certonnx_args(c) is not None for c in commands(ln))]
SYNOPSES = [(p, ln) for p, ln in ALL if _is_synopsis(ln.text) and certonnx_args(ln.text.split()) is not None]


def _paths(value: object) -> list[str]:
    if value is None or value == "-":
        return []
    if isinstance(value, (list, tuple)):
        return [p for v in value for p in _paths(v)]
    return [p for p in str(value).split(",") if p]


def _written_by_earlier_code(page: Page, before: int, path: str) -> bool:
    """A Python or shell snippet above ``before`` on the page writes ``path``: its first
    component is a quoted literal there (``Path("forms")``, ``"prop.vnnlib"``)."""
    top = Path(path).parts[0]
    return any(no < before and re.search(rf"""["']{re.escape(top)}(/[^"'\n]*)?["']""", text)
               for no, text in page.code)


def _other_outputs(words: list[str]) -> list[str]:
    """Folders an example script or tool is told to write (``--out-dir work``)."""
    return [words[i + 1] for i, w in enumerate(words[:-1]) if w in OTHER_OUTPUT_FLAGS]


def test_docs_have_commands() -> None:
    """The extraction works: a change of the fence or prompt style must not silently check nothing."""
    pages = {p.path.name for p, _ in COMMAND_LINES}
    assert {"README.md", "quickstart.md", "certify.md", "finetune.md", "check.md", "pipeline.md"} <= pages
    assert len(COMMAND_LINES) >= 30
    assert len(SYNOPSES) >= 4


@pytest.mark.parametrize("page_line", COMMAND_LINES, ids=lambda pl: pl[1].where)
def test_documented_command_parses_and_files_exist(page_line: tuple[Page, Line]) -> None:
    page, line = page_line
    produced = _produced_before(page, line)
    for c in commands(line):
        args = certonnx_args(c)
        if args is None:
            continue
        args, _ = strip_redirects(line, args)
        p = parse(line, args)
        check_method_options(p)
        for key in INPUTS:
            for f in _paths(p.params.get(key)):
                assert (ROOT / f).exists() or f in produced or _under(f, produced) or \
                    _written_by_earlier_code(page, line.lineno, f), (
                    f"{line.where}: {f!r} (the {key} of `certonnx {p.name}`) is neither in the repository nor "
                    f"written by an earlier command of the page: {line.text!r}")


def _under(path: str, folders: set[str]) -> bool:
    return any(Path(path).is_relative_to(Path(d)) for d in folders)


def _produced_before(page: Page, line: Line) -> set[str]:
    """Files and folders written by the commands above ``line`` on its page."""
    out: set[str] = set()
    for earlier in page.lines:
        if earlier.lineno >= line.lineno:
            break
        if _is_synopsis(earlier.text):
            continue
        for c in commands(earlier):
            c, written = strip_redirects(earlier, c)
            out.update(written)
            args = certonnx_args(c)
            if args is None:
                out.update(_other_outputs(c))
                continue
            try:
                p = parse(earlier, args)
            except AssertionError:
                continue  # reported by that line's own test
            for key in OUTPUTS:
                out.update(_paths(p.params.get(key)))
    return out


@pytest.mark.parametrize("page_line", SYNOPSES, ids=lambda pl: pl[1].where)
def test_synopsis_names_real_flags(page_line: tuple[Page, Line]) -> None:
    _, line = page_line
    args = certonnx_args(line.text.split())
    assert args, f"{line.where}: no command in {line.text!r}"
    name = args[0]
    with cli.make_context("certonnx", [name]) as ctx:
        cmd = cli.get_command(ctx, name)
    assert cmd is not None, f"{line.where}: unknown command {name!r}"
    known = {o for prm in cmd.params for o in (*prm.opts, *prm.secondary_opts)} | {"-h", "--help"}
    flags = set(re.findall(r"(?<![\w-])(--?[A-Za-z][\w-]*)", line.text))
    assert flags <= known, f"{line.where}: `certonnx {name}` has no {sorted(flags - known)}"


def test_parser_refuses_what_it_should() -> None:
    """The checks above can fail: an unknown flag, a bad choice, an unquoted ``>=``, a missing file."""
    line = Line(ROOT / "README.md", 1, "")
    ok = parse(line, ["certify", "m.onnx", "--data", "x.npy,y.npy", "--norm", "linf:8/255", "-o", "c.onnx"])
    assert ok.params["output"] == "c.onnx" and _paths(ok.params["data"]) == ["x.npy", "y.npy"]
    with pytest.raises(AssertionError, match="NoSuchOption"):
        parse(line, ["certify", "m.onnx", "--data", "d.npz", "--norm", "linf:0.1", "--no-such-flag"])
    with pytest.raises(AssertionError, match="BadParameter"):
        parse(line, ["certify", "m.onnx", "--data", "d.npz", "--norm", "linf:0.1", "--method", "magic"])
    with pytest.raises(AssertionError, match="BadParameter"):
        parse(line, ["certify", "m.onnx", "--data", "d.npz", "--norm", "l7:0.1"])
    ft = ["finetune", "m.onnx", "--data", "d.npz", "--norm", "linf:0.1", "--method", "gls"]
    check_method_options(parse(line, [*ft, "--method-opt", "gls_sigma=0.2"]))
    with pytest.raises(AssertionError, match="bad method option"):
        check_method_options(parse(line, [*ft, "--method-opt", "gls_sigmaa=0.2"]))
    with pytest.raises(AssertionError, match="no command 'certfy'"):
        parse(line, ["certfy", "m.onnx"])
    with pytest.raises(AssertionError, match="redirection"):
        strip_redirects(line, shell_words("certonnx check r.onnx --require linf:0.1>=0.9"))
    assert strip_redirects(line, shell_words("certonnx check r.onnx --require 'linf:0.1>=0.9' > v.txt")) == (
        ["certonnx", "check", "r.onnx", "--require", "linf:0.1>=0.9"], ["v.txt"])
    with pytest.raises(AssertionError, match="no command"):
        parse(line, ["--no-such-command"])
    page = Page(ROOT / "README.md", code=[(1, 'open("forms/x.npy")')])
    assert _written_by_earlier_code(page, 5, "forms/x.npy")
    assert not _written_by_earlier_code(page, 1, "forms/x.npy")
    assert not _written_by_earlier_code(page, 5, "model.onnx")
