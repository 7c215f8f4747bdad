"""Every generated table in README.md and docs/ equals what benchmarks/report.py writes from the JSON."""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path

ROOT = Path(__file__).parents[1]
spec = importlib.util.spec_from_file_location("report", ROOT / "benchmarks" / "report.py")
report = importlib.util.module_from_spec(spec)
spec.loader.exec_module(report)


def test_generated_tables_are_current():
    assert report.main(["--check"]) == 0


def test_every_marker_names_a_known_table_and_is_closed():
    for path in report.FILES:
        text = path.read_text(encoding="utf-8")
        opened = re.findall(r"<!-- table:(\w+) -->", text)
        closed = re.findall(r"<!-- /table:(\w+) -->", text)
        assert opened == closed, path
        assert set(opened) <= set(report.TABLES), path


def test_a_hand_edit_is_caught(tmp_path, monkeypatch):
    readme = tmp_path / "README.md"
    readme.write_text("x\n<!-- table:overhead_cpu -->\n| typed | by hand |\n<!-- /table:overhead_cpu -->\n")
    monkeypatch.setattr(report, "FILES", [readme])
    monkeypatch.setattr(report, "ROOT", tmp_path)
    assert report.main(["--check"]) == 1
    assert report.main([]) == 0 and report.main(["--check"]) == 0
    assert report.render("overhead_cpu") in readme.read_text()
