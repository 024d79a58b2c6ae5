"""README.md and docs/*.md: every relative link, anchor and repository path they name exists."""

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")
# A path into the repository as the pages write one: `examples/x.py`, `tests/fixtures/...`
REPO_PATH = re.compile(r"(?<![\w/.-])((?:examples|tests|mlx_falcon_h1|convert|docs)/[\w./-]*\w)")


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to hyphens."""
    text = re.sub(r"[^\w\- ]", "", heading.strip().lower())
    return text.replace(" ", "-")


def anchors(page: Path) -> set:
    text = re.sub(r"```.*?```", "", page.read_text(), flags=re.S)  # no headings in code
    return {slug(m) for m in re.findall(r"^#+ (.*)$", text, flags=re.M)}


def test_slug_follows_github():
    assert slug("Speed, and MLX's CPU backend on Linux") == "speed-and-mlxs-cpu-backend-on-linux"
    assert slug("Bounded attention: `--max-kv-size`") == "bounded-attention---max-kv-size"


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_relative_links_resolve(page):
    links = LINK.findall(page.read_text())
    broken = []
    for target in links:
        if re.match(r"[a-z]+:", target):  # https:, mailto:
            continue
        file, _, anchor = target.partition("#")
        path = (page.parent / file).resolve() if file else page
        if not path.exists():
            broken.append(f"{target}: no file {path}")
        elif anchor and path.suffix == ".md" and anchor not in anchors(path):
            broken.append(f"{target}: no heading #{anchor} in {path.name}")
    assert not broken, f"{page.name}: " + "; ".join(broken)


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_repository_paths_exist(page):
    missing = sorted({p for p in REPO_PATH.findall(page.read_text()) if not (ROOT / p).exists()})
    assert not missing, f"{page.name} names paths the repository does not have: {missing}"


def test_readme_is_short_and_links_every_page():
    readme = (ROOT / "README.md").read_text()
    assert len(readme.splitlines()) < 250
    linked = {(ROOT / t.partition("#")[0]).resolve() for t in LINK.findall(readme)}
    assert set(PAGES[1:]) <= linked, "docs pages not linked from README"


# Absolute paths of a developer's machine (a checkout, a home folder) and the
# design notes kept beside the checkout: a reader of the package has none of them.
MACHINE_PATH = re.compile("(?<![\\w.~])/(?:" + "|".join(["work", "root", "home", "Users"]) + r")/|\.\./shared/")


def test_no_file_cites_a_path_outside_the_project():
    """Code, docs, config and records cite what a reader can open: a path in the
    repository, a URL; never a path on one developer's machine."""
    tracked = [p for p in ROOT.rglob("*") if p.suffix in {".py", ".md", ".toml", ".json", ".jinja"} or p.name == "run"]
    found = []
    for path in tracked:
        rel = path.relative_to(ROOT)
        if rel.parts[0].startswith(".") and rel.parts[0] != ".ci" or "egg-info" in str(rel) or not path.is_file():
            continue  # virtual environments, caches, build records
        for n, line in enumerate(path.read_text(errors="replace").splitlines(), 1):
            if MACHINE_PATH.search(line):
                found.append(f"{rel}:{n}: {line.strip()[:100]}")
    assert not found, "\n".join(found)
