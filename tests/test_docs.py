"""The README and docs/: every relative link resolves, and the README's commands exist in the CLI."""

import ast
import re
import shlex
from pathlib import Path

import pytest

from vllm_smoothquant.offline.api import OPTION_NAMES
from vllm_smoothquant.offline.cli import build_parser

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
DOCS = sorted([README, *(ROOT / "docs").glob("*.md")])
FENCE = re.compile(r"^```.*?^```", re.S | re.M)
LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)\)")


def _prose(text: str) -> str:
    return FENCE.sub("", text)


def _slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to hyphens."""
    s = re.sub(r"[`*_]", "", heading.strip().lower())
    return re.sub(r"[^\w\- ]", "", s).replace(" ", "-")


def _anchors(md: Path) -> set[str]:
    return {_slug(m.group(1)) for m in re.finditer(r"^#+\s+(.*)$", _prose(md.read_text()), re.M)}


def _links(md: Path):
    for target in LINK.findall(_prose(md.read_text())):
        if not re.match(r"[a-z]+:", target):  # http:, https:, mailto:
            yield target


@pytest.mark.parametrize("md", DOCS, ids=lambda p: str(p.relative_to(ROOT)))
def test_relative_links_resolve(md):
    broken = []
    for target in _links(md):
        path, _, anchor = target.partition("#")
        dest = (md.parent / path).resolve() if path else md
        if not dest.exists():
            broken.append(f"{target}: no such file")
        elif anchor and dest.suffix == ".md" and anchor not in _anchors(dest):
            broken.append(f"{target}: no heading #{anchor} in {dest.name}")
    assert not broken, f"{md.name}: " + "; ".join(broken)


def test_docs_are_linked_from_the_readme():
    linked = {(ROOT / t.partition("#")[0]).resolve() for t in _links(README)}
    assert [d.name for d in DOCS if d != README and d.resolve() not in linked] == []


def _code_blocks(md: Path, lang: str | None = None) -> list[str]:
    blocks = re.findall(r"^```(\w*)\n(.*?)^```", md.read_text(), re.S | re.M)
    return [body for tag, body in blocks if lang is None or tag == lang]


def _cli_calls(text: str):
    """``vllm-smoothquant SUB ARGS`` run as a command (not ``pip install vllm-smoothquant``), from shell lines
    (continuations joined, comments dropped)."""
    for line in text.replace("\\\n", " ").splitlines():
        m = re.search(r"(?:^|&&|;|\|)\s*(?:\S*/)?vllm-smoothquant\s+(.*)", line)
        if m:
            args = shlex.split(re.sub(r"[\[\]]", " ", m.group(1)), comments=True)  # [--opt] of usage lines
            yield args[0], [a.split("=")[0] for a in args[1:] if a.startswith("--")]


def test_readme_commands_exist_in_the_cli():
    sub = next(a for a in build_parser()._actions if a.dest == "command").choices
    calls = [c for block in _code_blocks(README) for c in _cli_calls(block)]
    assert {name for name, _ in calls} >= {"demo", "quantize", "eval", "convert"}
    for name, flags in calls:
        assert name in sub, f"README: vllm-smoothquant {name}: no such subcommand"
        known = {o for a in sub[name]._actions for o in a.option_strings}
        assert not set(flags) - known, f"README: vllm-smoothquant {name} {sorted(set(flags) - known)}: no such flag"


@pytest.mark.parametrize("md", [d for d in DOCS if d != README], ids=lambda p: p.name)
def test_docs_commands_exist_in_the_cli(md):
    sub = next(a for a in build_parser()._actions if a.dest == "command").choices
    for name, flags in (c for block in _code_blocks(md) for c in _cli_calls(block)):
        assert name in sub, f"{md.name}: vllm-smoothquant {name}: no such subcommand"
        known = {o for a in sub[name]._actions for o in a.option_strings}
        assert not set(flags) - known, f"{md.name}: vllm-smoothquant {name} {sorted(set(flags) - known)}: no such flag"


def test_readme_python_example_uses_the_api_keywords():
    calls = [n for block in _code_blocks(README, "python") for n in ast.walk(ast.parse(block))
             if isinstance(n, ast.Call) and getattr(n.func, "id", None) == "quantize"]
    assert calls
    for call in calls:
        assert {k.arg for k in call.keywords} <= {*OPTION_NAMES, "overwrite"}


def test_readme_is_one_page_and_keeps_the_ci_command():
    text = README.read_text()
    assert len(text.encode()) <= 12_000
    command = "bash .ci/setup && .venv/bin/python -m pytest tests"
    assert command in text and "CI (`.ci/run`) runs exactly this" in text
    assert command in (ROOT / ".ci" / "run").read_text()
    assert "bash .ci/setup && .venv/bin/vllm-smoothquant demo" in text
