"""The scripts that write BENCHMARKS.md never lose hand-written text or committed figures."""

from __future__ import annotations

import importlib.util
import shutil
from pathlib import Path

BENCHMARKS = Path(__file__).resolve().parent.parent / "benchmarks"


def _script(name: str, root: Path = BENCHMARKS):
    spec = importlib.util.spec_from_file_location(name, root / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _copy_of_benchmarks(tmp_path: Path) -> Path:
    copy = tmp_path / "benchmarks"
    shutil.copytree(BENCHMARKS, copy, ignore=shutil.ignore_patterns("runs", "__pycache__"))
    return copy


def test_make_tables_rebuilds_the_committed_file(tmp_path):
    copy = _copy_of_benchmarks(tmp_path)
    out = tmp_path / "BENCHMARKS.md"
    assert _script("make_tables", copy).main(["--benchmarks-md", str(out)]) == 0
    assert out.read_text() == (BENCHMARKS.parent / "BENCHMARKS.md").read_text()


def test_an_accuracy_section_written_elsewhere_still_gets_every_other_section(tmp_path):
    copy = _copy_of_benchmarks(tmp_path)
    out, accuracy = tmp_path / "B.md", tmp_path / "elsewhere" / "accuracy.md"
    assert _script("make_tables", copy).main(["--out", str(accuracy), "--benchmarks-md", str(out)]) == 0
    text = out.read_text()
    for section in ("overview", "speed", "pending"):
        first_line = (copy / "sections" / f"{section}.md").read_text().splitlines()[0]
        assert first_line in text
    assert accuracy.read_text().strip() in text


def test_regenerated_redundancy_tables_keep_the_hand_written_findings(tmp_path):
    bench_redundancy = _script("bench_redundancy")
    section = tmp_path / "redundancy.md"
    section.write_text("old tables\n\n" + bench_redundancy.FINDINGS_MARK + "\nFindings: D2 grows.\n")
    text = bench_redundancy.with_kept_findings("## new tables\n", section)
    assert text.startswith("## new tables") and "old tables" not in text
    assert text.endswith(bench_redundancy.FINDINGS_MARK + "\nFindings: D2 grows.\n")
    assert bench_redundancy.with_kept_findings("## new\n", tmp_path / "absent.md") == "## new\n"
