"""bench/report.py renders what the benchmarks write, targets included (no platform needed)."""

from __future__ import annotations

import json
from pathlib import Path

from bench.report import render_all


def write(path: Path, doc: object) -> None:
    path.write_text(json.dumps(doc))


def test_targets_are_a_checklist_with_the_count_and_each_verdict(tmp_path: Path) -> None:
    results = tmp_path / "results"
    results.mkdir()
    write(results / "proxy.json", {
        "title": "Proxy",
        "targets": [{"target": "connect p50", "goal": "<= 1.5x direct", "measured": "1.20x", "met": True},
                    {"target": "TPS | 8 clients", "goal": ">= 0.95x PgBouncer", "measured": "0.90x", "met": False}],
        "tables": [{"title": "Throughput", "columns": ["way", "TPS"], "rows": [["proxy", 100]]}],
        "meta": {"cmd": "python bench/proxy.py", "note": "a dry run"},
    })
    page = render_all(results, tmp_path / "benchmarks.md").read_text()
    assert page.index("> **Note:** a dry run") < page.index("### Targets")  # the caveat comes first
    assert "### Targets: 1 of 2 met" in page
    assert "| connect p50 | <= 1.5x direct | 1.20x | met |" in page
    assert "| TPS \\| 8 clients | >= 0.95x PgBouncer | 0.90x | NOT met |" in page  # a pipe cannot split a cell
    assert page.index("### Targets") < page.index("### Throughput")
    assert "python bench/proxy.py" in page


def test_a_bad_targets_field_is_ignored_not_fatal(tmp_path: Path) -> None:
    results = tmp_path / "results"
    results.mkdir()
    write(results / "a.json", {"title": "A", "targets": "all met", "columns": ["x"], "rows": [[1]]})
    write(results / "b.json", {"title": "B", "targets": [1, "x", None], "columns": ["x"], "rows": [[2]]})
    write(results / "c.json", ["not", "an", "object"])
    page = render_all(results, tmp_path / "benchmarks.md").read_text()
    assert "Targets" not in page  # nothing claimed met from a field that states no target
    assert "| 1 |" in page and "| 2 |" in page
    assert "c.json: not a JSON object" in page
