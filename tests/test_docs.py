"""The README stays short and true, and no link in it or in the docs site is broken (issue 34, item 6).

`make docs` (run by `make test`, so by CI) builds the site with `mkdocs build --strict`; the hook in
docs/_hooks/repo_files.py checks the docs' links to files outside docs/ (reports, benchmarks). The fast
tests here check what that build cannot see: the README's own links and the commands it promises."""

from __future__ import annotations

import importlib
import importlib.util
import re
import shlex
import shutil
import subprocess
import sys
import unicodedata
from pathlib import Path

import pytest

ROOT = Path(__file__).parents[1]
README = ROOT / "README.md"
DOCS = ROOT / "docs"
LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)\)")
FENCE = re.compile(r"^(```|~~~).*?^\1", re.S | re.M)
CODE_PATH = re.compile(r"`((?:reports|benchmarks)/[^`\s]+)`")


def slug(heading: str) -> str:
    """A heading's anchor as MkDocs (Python-Markdown's toc) and the repository host make it."""
    text = unicodedata.normalize("NFKD", heading).encode("ascii", "ignore").decode()
    text = re.sub(r"[^\w\s-]", "", text).strip().lower()
    return re.sub(r"[-\s]+", "-", text)


def anchors(page: Path) -> set[str]:
    text = FENCE.sub("", page.read_text(encoding="utf-8"))
    return {slug(h) for h in re.findall(r"^#{1,6}\s+(.+?)\s*#*$", text, re.M)}


def broken_links(page: Path) -> list[str]:
    """Each relative link of a Markdown page whose file (or heading anchor, in a Markdown file) is missing."""
    broken = []
    for target in LINK.findall(FENCE.sub("", page.read_text(encoding="utf-8"))):
        if "://" in target or target.startswith("mailto:"):
            continue
        path, _, anchor = target.partition("#")
        file = (page.parent / path).resolve() if path else page
        if not file.is_file() or ROOT not in file.parents:
            broken.append(target)
        elif anchor and file.suffix == ".md" and anchor not in anchors(file):
            broken.append(target)
    return broken


def docs_pages() -> list[Path]:
    return sorted(p for p in DOCS.rglob("*.md") if "_hooks" not in p.parts)


def test_the_readme_is_read_in_five_minutes():
    assert len(README.read_text(encoding="utf-8").splitlines()) <= 150


@pytest.mark.parametrize("page", [README, *docs_pages()], ids=lambda p: str(p.relative_to(ROOT)))
def test_every_relative_link_reaches_a_file_and_its_heading(page):
    assert broken_links(page) == []


@pytest.mark.parametrize("page", [README, *docs_pages()], ids=lambda p: str(p.relative_to(ROOT)))
def test_every_report_or_benchmark_named_as_a_path_exists(page):
    named = {m.rstrip("/.,;:") for m in CODE_PATH.findall(page.read_text(encoding="utf-8"))}
    named = {p for p in named if not re.search(r"[*<>]|\.\.\.", p)}  # patterns and placeholders, not paths
    assert sorted(p for p in named if not (ROOT / p).exists()) == []


SOURCE_FILE = re.compile(r"`([\w./-]+\.py)`")
MODULE = re.compile(r"\bllm_modules(?:\.\w+)+")
RENAMED = "## Renamed modules and parameters"


def renamed_rows() -> list[tuple[str, str]]:
    """(before, now) cells of the table of renamed modules in docs/cli.md."""
    text = (DOCS / "cli.md").read_text(encoding="utf-8")
    if RENAMED not in text:
        return []
    table = text[text.index(RENAMED):].split("\n## ")[0]
    rows = [[cell.strip() for cell in line.strip().strip("|").split(" | ")]
            for line in table.splitlines() if line.startswith("| ")]
    return [(before, now) for before, now in rows[1:]]  # past the header


def source_files() -> list[str]:
    """Every .py file of the repository, by its path from the root."""
    return [str(p.relative_to(ROOT)) for top in ("llm_modules", "benchmarks", "tests", "docs")
            for p in (ROOT / top).rglob("*.py")]


def named_file_exists(name: str, files: list[str]) -> bool:
    """A .py file named by its path from the root or by its last parts (`data/prompting.py`)."""
    return any(f == name or f.endswith("/" + name) for f in files)


@pytest.mark.parametrize("page", [README, *docs_pages()], ids=lambda p: str(p.relative_to(ROOT)))
def test_every_source_file_and_module_named_exists(page):
    """Module paths the docs name are true of the code (the renamed table's "before" column aside)."""
    text = page.read_text(encoding="utf-8")
    for before, _ in renamed_rows():
        text = text.replace(f"| {before} |", "| |")
    files = source_files()
    assert sorted(n for n in set(SOURCE_FILE.findall(text)) if not named_file_exists(n, files)) == []
    missing = []
    for module in set(MODULE.findall(text)):
        try:
            found = importlib.util.find_spec(module) is not None
        except ModuleNotFoundError:
            found = False
        if not found:
            missing.append(module)
    assert sorted(missing) == []


def test_the_renamed_modules_are_gone_and_their_new_homes_exist():
    files, rows = source_files(), renamed_rows()
    assert len(rows) >= 6
    for before, now in rows:
        old = SOURCE_FILE.findall(before)
        assert [n for n in old if named_file_exists(n, files)] == [], before
        assert all(named_file_exists(n, files) for n in SOURCE_FILE.findall(now)), now
        for path in old:  # the old import path does not import (unless a package of the same name replaced it)
            if f"`{path.removesuffix('.py')}/`" not in now:
                with pytest.raises(ModuleNotFoundError):
                    importlib.import_module(path.removesuffix(".py").replace("/", "."))


def test_the_link_check_finds_a_broken_link_and_a_missing_heading(tmp_path, monkeypatch):
    monkeypatch.setattr(sys.modules[__name__], "ROOT", tmp_path)
    (tmp_path / "reports").mkdir()
    (tmp_path / "reports" / "r.md").write_text("# Results\n\n## Batch 8\n")
    page = tmp_path / "page.md"
    page.write_text("[ok](reports/r.md#batch-8) [gone](reports/gone.md) [bad anchor](reports/r.md#batch-1)\n"
                    "```\n[in code](reports/nothing.md)\n```\n")
    assert broken_links(page) == ["reports/gone.md", "reports/r.md#batch-1"]


def which_to_use(page: Path) -> list[str]:
    """The rows of a page's "Which to use for what" table, links read from the repository root."""
    text = page.read_text(encoding="utf-8")
    table = text[text.index("## Which to use for what"):].split("\n## ")[0]
    rows = [line for line in table.splitlines() if line.startswith("|")]
    return [row.replace("](../reports/", "](reports/") for row in rows] if page.parent == DOCS else rows


def test_the_docs_home_page_shows_the_readmes_table():
    assert len(which_to_use(README)) >= 4 and which_to_use(DOCS / "index.md") == which_to_use(README)


def test_the_docs_home_page_is_the_readme_up_to_its_list_of_pages():
    """docs/index.md repeats the README (links read from docs/), so the two cannot drift apart."""
    def from_root(match: re.Match) -> str:
        target = match.group(2)
        if "://" in target or target.startswith("#"):
            return match.group(0)
        target = target[3:] if target.startswith("../") else "docs/" + target
        return f"{match.group(1)}({target})"

    home = (DOCS / "index.md").read_text(encoding="utf-8")
    home = re.sub(r"(!?\[[^\]]*\])\(([^)\s]+)\)", from_root, home.split("\nThe rest of the documentation")[0])
    assert home == README.read_text(encoding="utf-8").split("\n## Documentation")[0]


def test_the_readmes_set_up_commands_are_the_makefiles():
    makefile = (ROOT / "Makefile").read_text()
    recipes = dict(re.findall(r"^([\w-]+):[^\n]*\n((?:\t[^\n]*\n)+)", makefile, re.M))
    deps = dict(re.findall(r"^([\w-]+):([^\n=]*)$", makefile, re.M))
    assert recipes["demo"].strip() == "$(BIN)/llm-modules train"  # README: `make demo` runs `llm-modules train`
    assert "docs" in deps["test"].split() and recipes["test"].strip() == "$(BIN)/python -m pytest -q"
    assert recipes["docs"].strip() == "$(BIN)/mkdocs build --strict -d site"
    readme = README.read_text(encoding="utf-8")
    assert "make demo   # venv + install, then `llm-modules train`" in readme
    assert "make test   # venv + install, then the docs build (`make docs`) and the whole test suite (`python -m pytest -q`)" in readme
    assert "/site/" in (ROOT / ".gitignore").read_text().splitlines()
    assert "make test" in (ROOT / ".ci" / "run").read_text()


def test_the_readmes_command_line_quick_start_parses():
    from llm_modules.entrypoints.cli import build_parser

    readme = README.read_text(encoding="utf-8")
    block = readme[readme.index("## Quick start: command line"):].split("```bash")[1].split("```")[0]
    lines = [line.split("  #")[0].strip() for line in block.replace("\\\n", " ").splitlines()]
    commands = [shlex.split(line)[1:] for line in lines if line.startswith("llm-modules")]
    assert len(commands) >= 8
    for args in commands:
        build_parser().parse_args(args)  # an unknown flag or value exits


def mkdocs_build(config: Path, site: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "-f", str(config), "-d", str(site)],
                          capture_output=True, text=True, timeout=300)


@pytest.mark.subprocess
def test_the_docs_site_builds_with_warnings_as_errors(tmp_path):
    pytest.importorskip("mkdocs")
    done = mkdocs_build(ROOT / "mkdocs.yml", tmp_path / "site")
    assert done.returncode == 0, done.stderr
    # a report linked from a page is in the site, rendered, beside its plot
    assert (tmp_path / "site" / "repo" / "reports" / "speculative" / "all_rows" / "results" / "index.html").is_file()
    assert (tmp_path / "site" / "repo" / "reports" / "equal_time" / "gsm_symbolic" / "val_bpb_vs_seconds.png").is_file()


@pytest.mark.subprocess
@pytest.mark.parametrize("link, error", [
    ("[report](../reports/missing/results.md)", "docs/index.md: (../reports/missing/results.md) is not a file"),
    ("[page](missing.md)", "'missing.md', but the target is not found"),
    ("", 'not included in the "nav" configuration:\n  - stray.md'),  # a page left out of the nav
    ("[chained](../reports/r/chain.md)", "reports/r/chain.md: (gone.json) is not a file"),  # a report's own link
    ("[heading](other.md#no-such-heading)", "does not contain an anchor '#no-such-heading'"),
])
def test_a_broken_link_fails_the_docs_build(tmp_path, link, error):
    pytest.importorskip("mkdocs")
    (tmp_path / "docs").mkdir()
    (tmp_path / "reports" / "r").mkdir(parents=True)
    (tmp_path / "reports" / "r" / "results.md").write_text("# Results\n\n[raw](results.json)\n")
    (tmp_path / "reports" / "r" / "results.json").write_text("{}")
    (tmp_path / "reports" / "r" / "chain.md").write_text("# Chain\n\n[raw](gone.json)\n")
    shutil.copytree(DOCS / "_hooks", tmp_path / "docs" / "_hooks")
    config = (ROOT / "mkdocs.yml").read_text()
    config = config[:config.index("nav:")] + "nav:\n  - Home: index.md\n  - Other: other.md\n"
    (tmp_path / "mkdocs.yml").write_text(config)
    (tmp_path / "docs" / "other.md").write_text("# Other\n\n## A heading\n")
    (tmp_path / "docs" / "index.md").write_text("# Home\n\n[fine](../reports/r/results.md) [fine](other.md#a-heading)\n")
    unbroken = mkdocs_build(tmp_path / "mkdocs.yml", tmp_path / "site")
    assert unbroken.returncode == 0, unbroken.stderr  # the same site, unbroken: the report and its own link
    assert (tmp_path / "site" / "repo" / "reports" / "r" / "results.json").is_file()
    (tmp_path / "docs" / "index.md").write_text(f"# Home\n\n[fine](../reports/r/results.md) {link}\n")
    if not link:
        (tmp_path / "docs" / "stray.md").write_text("# Stray\n")
    done = mkdocs_build(tmp_path / "mkdocs.yml", tmp_path / "site")
    assert done.returncode != 0 and error in done.stderr, done.stderr
