"""The documentation's links lead somewhere, the code cites only documents that exist,
and the results page can be rebuilt from its records."""

from __future__ import annotations

import importlib.util
import json
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]
LINK = re.compile(r"(?<!!)\[[^\]]*\]\(([^)\s]+)\)")


def _slug(heading: str) -> str:
    """The anchor mkdocs (python-markdown's toc) gives a heading."""
    text = re.sub(r"[`*_]", "", heading.strip().lower())
    text = re.sub(r"[^\w\s-]", "", text)
    return re.sub(r"[\s]+", "-", text).strip("-")


def _anchors(page: Path) -> set[str]:
    text = re.sub(r"```.*?```", "", page.read_text(), flags=re.S)
    return {_slug(line.lstrip("#")) for line in text.splitlines() if line.startswith("#")}


def _broken(page: Path) -> list[str]:
    text = re.sub(r"```.*?```", "", page.read_text(), flags=re.S)
    broken = []
    for target in LINK.findall(text):
        if re.match(r"[a-z]+:", target):
            continue  # an external address: not checked without network
        path, _, anchor = target.partition("#")
        linked = (page.parent / path).resolve() if path else page
        if not linked.exists():
            broken.append(f"{page.relative_to(ROOT)}: {target} (no such file)")
        elif anchor and linked.suffix == ".md" and anchor not in _anchors(linked):
            broken.append(f"{page.relative_to(ROOT)}: {target} (no such heading)")
    return broken


def test_every_relative_link_and_anchor_resolves():
    assert len(PAGES) > 10
    assert [problem for page in PAGES for problem in _broken(page)] == []


def test_the_link_check_finds_a_broken_link(tmp_path):
    page = tmp_path / "page.md"
    (tmp_path / "other.md").write_text("# A heading\n")
    page.write_text(
        "[ok](other.md#a-heading) [gone](missing.md) [bad](other.md#nowhere) "
        "[web](https://example.org)\n```\n[in code](ignored.md)\n```\n"
    )
    global ROOT
    saved, ROOT = ROOT, tmp_path
    try:
        assert _broken(page) == [
            "page.md: missing.md (no such file)",
            "page.md: other.md#nowhere (no such heading)",
        ]
    finally:
        ROOT = saved


def test_code_cites_only_documents_that_exist():
    cited = []
    for path in [*(ROOT / "src").rglob("*.py"), *(ROOT / "benchmarks").glob("*.py")]:
        for document in re.findall(r"\b(docs/[\w/.-]+\.md|DESIGN(?:\.md)?)", path.read_text()):
            if not (ROOT / document).exists():
                cited.append(f"{path.relative_to(ROOT)} cites {document}")
    assert cited == []


def test_readme_stays_a_short_guide():
    assert len((ROOT / "README.md").read_text().splitlines()) <= 200


def test_results_records_hold_what_the_page_is_drawn_from():
    """docs/results.md is rebuilt from docs/results.json when the runs' directories are
    gone: each record read back as a run gives the same record again."""
    spec = importlib.util.spec_from_file_location(
        "results_table", ROOT / "benchmarks" / "results_table.py"
    )
    results_table = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(results_table)
    records = json.loads((ROOT / "docs" / "results.json").read_text())
    assert records
    for record in records:
        again = results_table._record(results_table._from_record(record))
        again.pop("network_trained_on", None)  # read from the network, which is not here
        expected = {k: v for k, v in record.items() if k != "network_trained_on"}
        expected.setdefault("retention_by_age", {})
        expected.setdefault("method_config", {})
        assert again == expected, (record["method"], record["dataset"])
