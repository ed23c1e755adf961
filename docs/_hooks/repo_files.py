"""MkDocs hook: links from the docs to the repository's other files (reports, benchmarks).

A docs page links a report the way it reads on the repository host and in an editor, relative to
the page: `[report](../reports/speculative/all_rows/results.md)`. MkDocs knows only the files
under `docs/`, so on its own it reports such a link as not found (an error under `--strict`) and
the built site would have nothing behind it. This hook:

1. checks every such link before the build: a target that is not a file inside the repository
   fails the build with one line per broken link (page, link);
2. adds each linked file to the site under `repo/<its path in the repository>`, not in the nav
   (a report's `results.md` becomes a rendered page, a plot an image);
3. rewrites the link on the built page to that copy, so MkDocs then validates it (anchors too).

A copied Markdown file's own relative links are followed the same way (the copies mirror the
repository's folders, so those links need no rewriting). Only files a page links are copied, never a
whole folder (reports keep gigabytes of ignored work files beside them).
"""

from __future__ import annotations

import posixpath
import re
from pathlib import Path

from mkdocs.exceptions import PluginError
from mkdocs.structure.files import File, InclusionLevel

PREFIX = "repo"  # where the linked repository files sit in the built site
# [text](target) and ![alt](target), the target without spaces, an optional #anchor kept apart
LINK = re.compile(r"(!?\[[^\]]*\]\()([^)\s#]+)(#[^)\s]*)?\)")
FENCE = re.compile(r"^(```|~~~).*?^\1", re.S | re.M)


def _links(page_dir: Path, markdown: str):
    """(link target, resolved path) for each relative link of a page whose file lives in page_dir."""
    for match in LINK.finditer(FENCE.sub("", markdown)):
        target = match.group(2)
        if "://" in target or target.startswith(("/", "mailto:")):
            continue
        yield target, (page_dir / target).resolve()


def _outside_links(page_uri: str, markdown: str, docs_dir: Path):
    """(link target, resolved path) for each link of a docs page that leaves `docs/`."""
    for target, resolved in _links(docs_dir / posixpath.dirname(page_uri), markdown):
        if resolved != docs_dir and docs_dir not in resolved.parents:
            yield target, resolved  # inside docs/: MkDocs checks it


def on_files(files, config):
    docs_dir = Path(config.docs_dir).resolve()
    repo = docs_dir.parent
    broken = []
    # (where the page is written, its links): the docs pages, then each copied Markdown file in turn,
    # whose own relative links keep working because the copies mirror the repository's folders
    todo = [(f"docs/{p.src_uri}", list(_outside_links(p.src_uri, Path(p.abs_src_path).read_text(encoding="utf-8"),
                                                       docs_dir)))
            for p in files.documentation_pages()]
    while todo:
        where, links = todo.pop()
        for target, resolved in links:
            if repo not in resolved.parents or not resolved.is_file():
                broken.append(f"{where}: ({target}) is not a file in the repository")
                continue
            uri = f"{PREFIX}/{resolved.relative_to(repo).as_posix()}"
            if files.get_file_from_path(uri) is not None:
                continue
            files.append(File.generated(config, uri, abs_src_path=str(resolved), inclusion=InclusionLevel.NOT_IN_NAV))
            if resolved.suffix == ".md":
                todo.append((resolved.relative_to(repo).as_posix(),
                             list(_links(resolved.parent, resolved.read_text(encoding="utf-8")))))
    if broken:
        raise PluginError("broken links to repository files:\n" + "\n".join(sorted(broken)))
    return files


def on_page_markdown(markdown, page, config, files):
    if page.file.generated_by is not None:
        return markdown  # a copied repository file: its links are its own
    docs_dir = Path(config.docs_dir).resolve()
    repo = docs_dir.parent
    targets = {t: r for t, r in _outside_links(page.file.src_uri, markdown, docs_dir)}

    def rewrite(match):
        target = match.group(2)
        if target not in targets:
            return match.group(0)
        uri = f"{PREFIX}/{targets[target].relative_to(repo).as_posix()}"
        local = posixpath.relpath(uri, posixpath.dirname(page.file.src_uri) or ".")
        return f"{match.group(1)}{local}{match.group(3) or ''})"

    return LINK.sub(rewrite, markdown)
