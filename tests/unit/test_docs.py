"""The README and docs/ cite only tests and files that exist, and the README's commands are the ones CI runs."""

from __future__ import annotations

import ast
import re
from functools import cache
from pathlib import Path

import pytest

from tests.helpers import parse_module

REPO_ROOT = Path(__file__).resolve().parents[2]
DOCS = [REPO_ROOT / "README.md", *sorted((REPO_ROOT / "docs").glob("*.md"))]

# tests/e2e/test_x.py::test_name, ::TestClass::test_name, or a bare ::name that
# continues the last path cited before it in the same file.
TEST_ID = re.compile(r"(?P<path>tests/[\w/]+\.py)?(?P<names>(?:::\w+)+)|(?P<bare_path>tests/[\w/]+\.py)")
# [text](target), not images; the target up to a space or the closing parenthesis.
LINK = re.compile(r"(?<!!)\[[^\]]*\]\(([^)\s]+)\)")
# A section listing what is announced but not merged yet: its links may point
# at files that do not exist, and must not once they do.
COMING = "Coming in this release"


@cache
def names_in(path: Path) -> dict[str, set[str]]:
    """Top-level functions and classes of a test module, each class with its methods."""
    tree = parse_module(path)
    names: dict[str, set[str]] = {}
    for node in tree.body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            names[node.name] = set()
        elif isinstance(node, ast.ClassDef):
            names[node.name] = {
                n.name for n in node.body if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef))
            }
    return names


def cited_test_ids(text: str) -> list[tuple[str, list[str]]]:
    """Every (path, [name, ...]) cited, continuations resolved to the path before them."""
    cited: list[tuple[str, list[str]]] = []
    last_path: str | None = None
    for match in TEST_ID.finditer(text):
        if match["bare_path"]:
            last_path = match["bare_path"]
            cited.append((last_path, []))
            continue
        path = match["path"] or last_path
        if path is None:
            continue  # a :: with no test path before it is not a test id (e.g. a C++ name)
        last_path = path
        cited.append((path, match["names"].split("::")[1:]))
    return cited


def sections(text: str) -> list[tuple[str, str]]:
    """(heading, body) for each markdown section, the text before the first heading under ""."""
    parts = re.split(r"^(#{1,6} .*)$", text, flags=re.MULTILINE)
    result = [("", parts[0])]
    result += [(parts[i].lstrip("#").strip(), parts[i + 1]) for i in range(1, len(parts), 2)]
    return result


def strip_code_blocks(text: str) -> str:
    return re.sub(r"^```.*?^```", "", text, flags=re.MULTILINE | re.DOTALL)


def relative(doc: Path) -> str:
    return str(doc.relative_to(REPO_ROOT))


@pytest.mark.parametrize("doc", DOCS, ids=relative)
def test_every_cited_test_id_exists(doc: Path) -> None:
    """Each tests/...py::name, and each ::name continuing it, names a test function, class or method that exists."""
    missing = []
    for path, names in cited_test_ids(doc.read_text()):
        module = REPO_ROOT / path
        if not module.is_file():
            missing.append(f"{path} (no such file)")
            continue
        if not names:
            continue
        defined = names_in(module)
        head, *rest = names
        if head not in defined:
            missing.append(f"{path}::{head}")
        elif rest and rest[0] not in defined[head]:
            missing.append(f"{path}::{head}::{rest[0]}")
    assert not missing, f"{relative(doc)} cites tests that do not exist: {missing}"


@pytest.mark.parametrize("doc", DOCS, ids=relative)
def test_every_relative_link_points_to_a_file(doc: Path) -> None:
    """Each relative link points to a file or folder in the repository; an announced one only until it lands."""
    broken, landed = [], []
    for heading, body in sections(doc.read_text()):
        for target in LINK.findall(strip_code_blocks(body)):
            if re.match(r"^[a-z][a-z0-9+.-]*:", target) or target.startswith("#"):
                continue  # https:, mailto:, or an anchor in the same page
            exists = (doc.parent / target.split("#", 1)[0]).exists()
            if heading == COMING:
                if exists:
                    landed.append(target)
            elif not exists:
                broken.append(target)
    assert not broken, f"{relative(doc)} links to missing files: {broken}"
    assert not landed, f"{relative(doc)} announces under {COMING!r} what has landed, move it into the text: {landed}"


def ci_commands() -> str:
    """.ci/run's suite with its variables read as the README's .venv and python3."""
    text = (REPO_ROOT / ".ci" / "run").read_text()
    text = re.sub(r'"\$venv(/[^"]*)?"', r".venv\1", text)
    return text.replace('"$python"', "python3").replace(" -q ", " ")


@pytest.mark.parametrize("label", ["install", "the tests"])
def test_readme_install_and_test_commands_are_what_ci_runs(label: str) -> None:
    """The README's quick-start install and test lines appear, word for word, in .ci/run."""
    readme = (REPO_ROOT / "README.md").read_text()
    lines = [line for line in readme.splitlines() if line.rstrip().endswith(f"# {label}")]
    assert len(lines) == 1, f"README.md has {len(lines)} quick-start lines marked '# {label}'"
    command = lines[0].rsplit("#", 1)[0].strip()
    assert command in ci_commands(), f".ci/run does not run the README's {label} command: {command}"


def test_the_checker_sees_ids_continuations_and_broken_links() -> None:
    """The parsing above finds a full id, a ::continuation and a class method, and would flag a missing name."""
    text = "see `tests/unit/test_docs.py::test_every_cited_test_id_exists`, `::names_in` and `::Nope::x`"
    assert cited_test_ids(text) == [
        ("tests/unit/test_docs.py", ["test_every_cited_test_id_exists"]),
        ("tests/unit/test_docs.py", ["names_in"]),
        ("tests/unit/test_docs.py", ["Nope", "x"]),
    ]
    assert "Nope" not in names_in(Path(__file__))
    assert LINK.findall("a [x](docs/a.md#b) and ![img](i.png) and [y](https://e.org)") == [
        "docs/a.md#b",
        "https://e.org",
    ]
    assert [h for h, _ in sections("intro\n# A\ntext\n## Coming in this release\n- [q](q.md)\n")] == [
        "",
        "A",
        COMING,
    ]
