"""The docs tell the truth: every quoted figure is its source's, every cited path exists.

The convention (README.md, docs/*.md but the lead's docs/architecture.md,
benchmarks/README.md): a measured figure is quoted as a markdown link whose
text holds the number and whose target is a section of a results page,
`[fid 30.9](benchmarks/results/quality.md#rows-at-the-budget-median-minmax-over-seeds)`;
every number of the link's text must appear in that section. Outside such
links the prose holds no figure: no decimal, no number with a unit of time,
size or ratio, no number after a metric's name. The few phrases that look
like one but measure nothing (a version, a protocol constant) are listed in
NOT_MEASURED. Code (fenced blocks and `inline`) is not prose, but a fenced
block may not quote a metric either (a pasted log line is a measurement).
"""

from __future__ import annotations

import ast
import re
from fnmatch import fnmatchcase
from pathlib import Path

import pytest

from tests.conftest import REPO_ROOT

RESULTS = REPO_ROOT / "benchmarks" / "results"
DOCS = sorted(
    [REPO_ROOT / "README.md", REPO_ROOT / "benchmarks" / "README.md"]
    + [p for p in (REPO_ROOT / "docs").glob("*.md") if p.name != "architecture.md"]
)
# Pages that cite tests and files (the results pages too: faults.md names its tests).
CITING = DOCS + sorted(RESULTS.glob("*.md")) + [REPO_ROOT / "docs" / "architecture.md"]
# Generated, and checked value by value by tests/test_config.py.
GENERATED = ("<!-- settings table: generated", "<!-- end of settings table -->")

# Phrases with a figure's shape that measure nothing: versions, settings, constants.
NOT_MEASURED = re.compile("|".join((
    r"(?:Flower|flwr|in|and) 1\.4[12]", r"Python 3\.11", r"torch 2\.13\.0",
    r"4\.52 and 4\.53",  # selenium versions
    r"at most 1 MB a file and 10 MB in all",  # Flower Hub's bundle limits
    r"[Dd]irichlet[ (]0\.3\)?",  # a partitioner's setting
    r">= 0\.9",  # the bar a class must reach to count as drawn
    r"one 5 MB chunk",  # Flower's chunk size for arrays on the wire
    r"about 60 s",  # two of Flower's heartbeat intervals
    r"every 2 s",  # the dashboard page's polling interval
    r"every 10 s",  # the page opened as a file reloads on this period
    r"to 30 s, where W&B's own default is 90 s",  # recorder.WANDB_INIT_TIMEOUT_S
)))
METRIC = (r"fid|classifier-score|class-coverage|precision|recall|density|coverage|"
          r"conditional accuracy|conditional-accuracy|accuracy")
NUMBER = r"\d[\d,]*(?:\.\d+)?"
FIGURE = re.compile(
    rf"(?<![\w.])\d[\d,]*\.\d+(?![\w.]*\d)"  # a decimal: 34.6, 0.979
    rf"|(?<![\w.]){NUMBER}\s?(?:ms|s|min|h|seconds|minutes|hours|MB|GB|MiB|GiB)\b"
    rf"|(?<![\w.]){NUMBER}\s?(?:%|x\b|images/s)"
    rf"|\b(?:{METRIC})\s+(?:of\s+|at\s+)?{NUMBER}", re.IGNORECASE)
LINK = re.compile(r"!?\[((?:[^\[\]]|\[[^\]]*\])*)\]\(([^)\s]+)\)")


def _slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to '-'."""
    text = re.sub(r"[^\w\- ]", "", heading.strip().lower())
    return text.replace(" ", "-")


def _sections(page: Path) -> dict[str, str]:
    """Anchor -> the text from its heading to the next heading of its level or above."""
    lines, heads, fenced = page.read_text().splitlines(), [], False
    for i, line in enumerate(lines):
        fenced ^= line.lstrip().startswith("```")
        if not fenced and (m := re.match(r"(#+)\s+(.*)", line)):
            heads.append((i, len(m.group(1)), m.group(2)))
    sections: dict[str, str] = {}
    for n, (start, level, title) in enumerate(heads):
        end = next((i for i, lv, _ in heads[n + 1:] if lv <= level), len(lines))
        anchor, k = _slug(title), 1
        while anchor in sections:  # GitHub numbers repeated headings
            anchor, k = f"{_slug(title)}-{k}", k + 1
        sections[anchor] = "\n".join(lines[start:end])
    return sections


def _numbers(text: str) -> set[float]:
    """The numbers of a text as values (31.0 is 31; thousands separators dropped)."""
    return {float(n.replace(",", "")) for n in re.findall(NUMBER, text)}


def _prose(page: Path) -> list[tuple[int, str]]:
    """(line number, line) of a page's prose: fenced code and the generated table left out."""
    out, fenced, generated = [], False, False
    for number, line in enumerate(page.read_text().splitlines(), 1):
        if line.lstrip().startswith("```"):
            fenced = not fenced
        elif line.startswith(GENERATED[0]):
            generated = True
        elif line.startswith(GENERATED[1]):
            generated = False
        elif fenced:
            if re.search(rf"\b(?:{METRIC})\s+{NUMBER}", line):
                out.append((number, "fenced block quotes a metric: " + line))
        elif not generated:
            out.append((number, line))
    return out


def _check_quote(page: Path, text: str, target: str) -> str | None:
    """Why a link quoting a figure does not match its source, or None."""
    path, _, anchor = target.partition("#")
    source = (page.parent / path).resolve()
    if not anchor:
        return f"{target}: a quoted figure's link needs a #section"
    if not source.is_file():
        return f"{target}: no such file"
    sections = _sections(source)
    if anchor not in sections:
        return f"{target}: no section #{anchor} (has: {', '.join(sections)})"
    missing = _numbers(text) - _numbers(sections[anchor])
    return f"[{text}]({target}): {sorted(missing)} not in that section" if missing else None


def _figure_problems(page: Path) -> list[str]:
    """Every figure of a page that is not a checked quote of a results section."""
    name = page.relative_to(REPO_ROOT) if page.is_relative_to(REPO_ROOT) else page.name
    problems = []
    for number, line in _prose(page):
        if line.startswith("fenced block"):
            problems.append(f"{name}:{number}: {line}")
            continue
        line = re.sub(r"<!--.*?-->|`[^`]*`", "", line)
        for text, target in LINK.findall(line):
            if "benchmarks/results/" in target and target.split("#")[0].endswith(".md"):
                if _numbers(text) and (why := _check_quote(page, text, target)):
                    problems.append(f"{name}:{number}: {why}")
        # What is left once checked quotes (and link targets) are gone must hold no figure.
        rest = LINK.sub(lambda m: "" if "benchmarks/results/" in m.group(2) else m.group(1),
                        line)
        rest = NOT_MEASURED.sub("", rest)
        problems += [f"{name}:{number}: {m.group(0)!r} is a figure without a link to "
                     f"its results section: {line.strip()[:120]}"
                     for m in FIGURE.finditer(rest)]
    return problems


@pytest.mark.parametrize("page", DOCS, ids=lambda p: str(p.relative_to(REPO_ROOT)))
def test_every_figure_is_a_quote_that_matches_its_results_section(page: Path) -> None:
    # Prepare / Execute
    problems = _figure_problems(page)

    # Assert
    assert not problems, "\n".join(problems)


def test_the_figure_check_catches_a_wrong_quote_and_a_bare_figure(tmp_path: Path) -> None:
    # Prepare: a page with a right quote, a wrong one, a bare figure and a count
    page = tmp_path / "README.md"
    quality = "benchmarks/results/quality.md"
    anchor = "#rows-at-the-budget-median-minmax-over-seeds"
    page.write_text(f"ok [fid 30.9]({quality}{anchor}), 5 clients.\n"
                    f"wrong [fid 29.9]({quality}{anchor}).\n"
                    f"no anchor [fid 30.9]({quality}).\n"
                    "bare: the run took 226 s, fid 88, 0.87x.\n"
                    "```\nround 20/20: fid 34.6\n```\n")
    (tmp_path / "benchmarks").symlink_to(REPO_ROOT / "benchmarks")

    # Execute
    problems = _figure_problems(page)

    # Assert: each bad line once per problem, the good line and the count never
    lines = sorted(int(p.split(":")[1]) for p in problems)
    assert lines == [2, 3, 4, 4, 4, 6], problems


# --- cited tests, files and modules exist --------------------------------------------------

# `tests/test_x.py::test_name` (a glob with *), or a bare `test_name` after one: that file.
TEST_REF = re.compile(r"tests/(test_\w+\.py)::(\w[\w*]*)|`(test_\w+)(?:\[[^\]]*\])?`")
PATH_REF = re.compile(r"(?<![\w./-])((?:fedgan_app|deploy|harness|benchmarks|tests|docs)"
                      r"/[^\s`)\]\"',;:|]*)")
# Folders a run or a benchmark creates (gitignored): not in a fresh clone.
UNTRACKED = ("benchmarks/runs",)
MODULE_REF = re.compile(r"python -m ((?:fedgan_app|deploy|harness|benchmarks)[\w.]*)")


def _test_names(path: Path) -> set[str]:
    """Names of the functions a test file defines."""
    tree = ast.parse(path.read_text())
    return {n.name for n in ast.walk(tree)
            if isinstance(n, ast.FunctionDef | ast.AsyncFunctionDef)}


def _citation_problems(page: Path) -> list[str]:
    """Cited tests that do not exist, paths that are not there, modules -m cannot run."""
    problems = []
    for number, line in enumerate(page.read_text().splitlines(), 1):
        where, current = f"{page.relative_to(REPO_ROOT)}:{number}", None
        for file, name, bare in TEST_REF.findall(line):
            current = REPO_ROOT / "tests" / file if file else current
            if current is None:
                continue
            if not current.is_file():
                problems.append(f"{where}: no tests/{current.name}")
            elif not any(fnmatchcase(n, name or bare) for n in _test_names(current)):
                problems.append(f"{where}: no test {name or bare} in tests/{current.name}")
        for path in PATH_REF.findall(re.sub(r"\]\([^)]*\)|https?://\S+", "]", line)):
            path = path.rstrip(".")  # a path that ends a sentence
            if (not path.startswith(UNTRACKED) and not re.search(r"[<*{]", path)
                    and not (REPO_ROOT / path).exists()):
                problems.append(f"{where}: no {path}")
        for module in MODULE_REF.findall(line):
            base = REPO_ROOT / module.replace(".", "/")
            if not (base.with_suffix(".py").is_file() or (base / "__main__.py").is_file()):
                problems.append(f"{where}: python -m {module}: no such module")
    return problems


@pytest.mark.parametrize("page", CITING, ids=lambda p: str(p.relative_to(REPO_ROOT)))
def test_every_cited_test_file_and_module_exists(page: Path) -> None:
    # Prepare / Execute
    problems = _citation_problems(page)

    # Assert
    assert not problems, "\n".join(problems)


def test_every_relative_link_of_the_docs_resolves() -> None:
    # Prepare / Execute: links to files of the repository, with their anchors
    problems = []
    for page in DOCS + [REPO_ROOT / "docs" / "architecture.md"]:
        for _, target in LINK.findall(page.read_text()):
            if re.match(r"[a-z]+:", target) or target.startswith("#"):
                continue
            path, _, anchor = target.partition("#")
            source = (page.parent / path).resolve()
            if not source.exists():
                problems.append(f"{page.name}: {target}: no such file")
            elif anchor and source.suffix == ".md" and anchor not in _sections(source):
                problems.append(f"{page.name}: {target}: no such section")

    # Assert
    assert not problems, "\n".join(problems)
