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

Only files a page links are copied, never a whole folder (reports keep gigabytes of ignored work
files beside them).
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


def _outside_links(page_uri: str, markdown: str, docs_dir: Path):
    """(link target, resolved path) for each link of a page that leaves `docs/`."""
    text = FENCE.sub("", markdown)
    for match in LINK.finditer(text):
        target = match.group(2)
        if "://" in target or target.startswith(("/", "mailto:")):
            continue
        resolved = (docs_dir / posixpath.dirname(page_uri) / target).resolve()
        if resolved == docs_dir or docs_dir in resolved.parents:
            continue  # inside docs/: MkDocs checks it
        yield target, resolved


def on_files(files, config):
    docs_dir = Path(config.docs_dir).resolve()
    repo = docs_dir.parent
    broken = []
    for page in list(files.documentation_pages()):
        markdown = Path(page.abs_src_path).read_text(encoding="utf-8")
        for target, resolved in _outside_links(page.src_uri, markdown, docs_dir):
            if repo not in resolved.parents or not resolved.is_file():
                broken.append(f"docs/{page.src_uri}: ({target}) is not a file in the repository")
                continue
            uri = f"{PREFIX}/{resolved.relative_to(repo).as_posix()}"
            if files.get_file_from_path(uri) is None:
                files.append(File.generated(config, uri, abs_src_path=str(resolved),
                                            inclusion=InclusionLevel.NOT_IN_NAV))
    if broken:
        raise PluginError("broken links to repository files:\n" + "\n".join(broken))
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
