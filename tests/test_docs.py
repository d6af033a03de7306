"""The README and docs/: short README, links and images that resolve, command examples with real options."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest
import typer

from ddpmctl.cli.main import app

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
PAGES = [README, *sorted((ROOT / "docs").glob("*.md"))]
FENCE = re.compile(r"^```.*?^```", re.S | re.M)
LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)\)")  # [text](target) and ![alt](target)


def prose(path: Path) -> str:
    """The page without its fenced code blocks (a '#' there is a shell comment, a '[..](..)' is code)."""
    return FENCE.sub("", path.read_text(encoding="utf-8"))


def anchors(path: Path) -> set[str]:
    """GitHub's heading anchors: lower case, punctuation dropped, spaces to hyphens, -1, -2 on repeats."""
    seen: dict[str, int] = {}
    for heading in re.findall(r"^#{1,6}\s+(.+?)\s*$", prose(path), re.M):
        slug = re.sub(r"[^\w\- ]", "", heading.lower()).replace(" ", "-")
        n = seen.get(slug, 0)
        seen[slug] = n + 1
        if n:
            seen[f"{slug}-{n}"] = 1
    return set(seen)


def test_readme_fits_on_a_few_screens():
    lines = README.read_text(encoding="utf-8").count("\n")
    assert lines <= 220, f"README.md has {lines} lines: move detail into docs/"


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.relative_to(ROOT).as_posix())
def test_relative_links_and_images_resolve(page: Path):
    broken = []
    for target in LINK.findall(prose(page)):
        if re.match(r"[a-z]+:", target):  # http:, https:, mailto:
            continue
        file, _, anchor = target.partition("#")
        resolved = (page.parent / file).resolve() if file else page
        if not resolved.exists():
            broken.append(f"{target}: no file {resolved}")
        elif anchor and resolved.suffix == ".md" and anchor not in anchors(resolved):
            broken.append(f"{target}: no heading '#{anchor}' in {resolved.name}")
    assert not broken, f"{page.name}: " + "; ".join(broken)


@pytest.mark.parametrize("page", PAGES[1:], ids=lambda p: p.relative_to(ROOT).as_posix())
def test_each_docs_page_links_back_to_the_readme(page: Path):
    assert "](../README.md)" in page.read_text(encoding="utf-8")


def options_by_command() -> dict[str, set[str]]:
    """Every option name (both spellings of a yes/no flag) of each command, 'checkpoints prune' style."""
    root = typer.main.get_command(app)
    found = {}

    def walk(cmd, prefix: str) -> None:
        if hasattr(cmd, "commands"):
            for name, sub in cmd.commands.items():
                walk(sub, f"{prefix} {name}".strip())
        else:
            found[prefix] = {o for p in cmd.params for o in (*p.opts, *p.secondary_opts)}

    walk(root, "")
    return found


def example_lines(path: Path) -> list[str]:
    """Each ddpmctl command line in the page's fenced blocks, continuation lines joined, comments cut."""
    lines = []
    for block in FENCE.findall(path.read_text(encoding="utf-8")):
        joined = re.sub(r"\\\n\s*", " ", block)
        for line in joined.splitlines():
            code = line.split("  #")[0].split(" # ")[0]
            if re.search(r"(^|-m |\s)ddpmctl (\w+)", code) and not code.lstrip().startswith(("#", "from ", "import ")):
                lines.append(code)
    return lines


def test_command_examples_use_options_the_commands_have():
    options = options_by_command()
    wrong, checked = [], 0
    for page in PAGES:
        for line in example_lines(page):
            words = shlex.split(line)
            words = words[words.index("ddpmctl") + 1:]
            name = words[0] if words[0] != "checkpoints" else f"checkpoints {words[1]}"
            assert name in options, f"{page.name}: unknown command in: {line}"
            for word in words:
                if word.startswith("--") and word.split("=")[0] not in options[name]:
                    wrong.append(f"{page.name}: {name} has no {word}")
            checked += 1
    assert checked >= 20  # the pages' examples were found at all
    assert not wrong, "; ".join(wrong)
