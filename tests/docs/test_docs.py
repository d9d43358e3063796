"""The docs tell the code's story: links resolve inside the repository, the workload table matches
grinfer.bench.workloads, and the protocol page names every REST route and gRPC method."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from readme_util import DOCS, README, ROOT, heading_anchors, markdown_links

from grinfer.bench.workloads import WORKLOADS

PAGES = [README, *sorted(DOCS.glob("*.md"))]


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_links_stay_inside_the_repository_and_resolve(page: Path):
    for target in markdown_links(page.read_text()):
        if target.startswith(("http://", "https://")):
            continue
        path, _, anchor = target.partition("#")
        file = (page.parent / path).resolve() if path else page
        assert file.is_relative_to(ROOT), f"{page.name}: link {target!r} points outside the repository"
        assert file.exists(), f"{page.name}: link {target!r} names a missing file"
        if anchor:
            assert anchor in heading_anchors(file.read_text()), f"{page.name}: {target!r}: no such heading"


def test_readme_names_no_file_outside_the_repository():
    assert "../" not in README.read_text()


def table_rows(markdown: str, first_header: str) -> list[list[str]]:
    """The body rows of the markdown table whose first column is headed `first_header`."""
    lines = markdown.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith(f"| {first_header} |"))
    rows = []
    for line in lines[start + 2:]:
        if not line.startswith("|"):
            break
        rows.append([cell.strip() for cell in line.strip("|").split("|")])
    return rows


def test_workload_table_matches_the_benchmark_code():
    rows = table_rows((DOCS / "workloads.md").read_text(), "name")
    documented = {row[0]: row[1:] for row in rows}
    assert set(documented) == set(WORKLOADS)
    for name, w in WORKLOADS.items():
        expected = [w.preset, str(w.profile_tokens), str(w.static), str(w.realtime), str(w.candidates),
                    str(w.batch), "cold" if w.new_events is None else str(w.new_events), w.dtype]
        assert documented[name] == expected, name


def test_protocol_page_names_every_rest_route_and_grpc_method():
    page = (DOCS / "protocols.md").read_text()
    app_source = (ROOT / "grinfer/serving/app.py").read_text()
    routes = re.findall(r'@app\.(get|post|put|patch|delete)\("([^"]+)"', app_source)
    assert routes, "no routes found in grinfer/serving/app.py"
    for method, path in routes:
        assert f"`{method.upper()} {path}`" in page, f"docs/protocols.md does not document {method.upper()} {path}"
    rpcs = re.findall(r"^\s*rpc (\w+)\(", (ROOT / "grinfer/serving/proto/grinfer.proto").read_text(), re.M)
    assert rpcs
    for rpc in rpcs:
        assert f"| `{rpc}` |" in page, f"docs/protocols.md does not document the RPC {rpc}"
