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


def _paper_run(dataset: str, method: str, seed: int, dice: float, budget: str = "1000ep-bf16",
               device: str = "cuda") -> dict:
    return {"protocol": "paper", "dataset": dataset, "image": "test-set", "method": method, "budget": budget,
            "seed": seed, "dice_224": dice, "iou_224": dice - 0.1, "dice_native": dice, "iou_native": dice - 0.1,
            "epochs": 100, "train_s": 60.0, "device": device, "schedule": f"{device} schedule",
            "peak_rss_mb": 2000.0, "peak_gpu_mb": 1100.0 if device == "cuda" else None, "history": [{"epoch": 1}]}


def _jsonl(path: Path, rows: list[dict]) -> Path:
    import json

    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_merged_gpu_runs_join_the_committed_rows_without_replacing_them(tmp_path):
    import json

    merge = _script("merge_paper_runs", BENCHMARKS / "gpu")
    out, state = tmp_path / "results" / "paper.json", tmp_path / "paper.state.jsonl"
    merge.merge(out, [_jsonl(tmp_path / "cpu.jsonl", [_paper_run("glas", "unet", 0, 0.70, "60ep", "cpu")])],
                state_path=state)
    committed = json.loads(out.read_text())
    gpu = [_paper_run("glas", "unet", s, d) for s, d in ((0, 0.80), (1, 0.84))]
    again = _paper_run("glas", "unet", 0, 0.10, "60ep", "cpu")  # a key the file holds: its row stays
    state.unlink()  # a fresh clone: the state is rebuilt from the result file
    merge.merge(out, [_jsonl(tmp_path / "gpu.jsonl", [*gpu, again])], note="rows on cuda: a lent GPU",
                state_path=state)
    document = json.loads(out.read_text())
    assert document["environment"] == committed["environment"]
    assert document["note"] == "rows on cuda: a lent GPU"
    by_label = {(r["schedule_label"], r["resolution"]): r for r in document["results"]}
    assert by_label[("60ep", "224")]["dice"] == 0.70 and by_label[("60ep", "224")]["seeds"] == 1
    assert abs(by_label[("1000ep-bf16", "224")]["dice"] - 0.82) < 1e-12
    assert by_label[("1000ep-bf16", "224")]["seeds"] == 2 and by_label[("1000ep-bf16", "224")]["peak_gpu_mb"] == 1100
    assert all("history" not in r for r in document["runs"])
    assert len(document["runs"]) == 3


def test_the_paired_selfreg_effect_pairs_runs_by_seed():
    tables = _script("make_tables")
    runs = [_paper_run("monuseg", "unet", s, d) for s, d in ((0, 0.70), (1, 0.80), (2, 0.75))]
    runs += [_paper_run("monuseg", "selfreg_unet", s, d) for s, d in ((0, 0.72), (1, 0.81), (2, 0.74))]
    runs.append(_paper_run("monuseg", "selfreg_unet", 3, 0.99))  # no UNet of seed 3: not paired, not counted
    (line,) = tables.selfreg_effect({"runs": runs})
    # differences +2, +1, -1 points: mean +0.67, sample std 1.53, standard error 0.88
    assert "+0.67 (standard error 0.88; ahead on 2 of 3 seeds)" in line
    assert tables.selfreg_effect({"runs": runs[:1] + runs[3:4]}) == []  # one pair says nothing


def test_correction_margins_compare_methods_on_the_same_images_only():
    """Each method's mean is over the images it finished; one image each, not the same one,
    printed a margin between different images."""
    from napari_selfreg.bench.correction import summarize

    def row(image, method, dice):
        return {"dataset": "monuseg", "image": image, "method": method, "budget": "60s", "seed": 0,
                "rounds": [{"dice": dice, "stroke_fraction": 0.005}]}

    table = _script("make_tables").correction_table
    config = {"correction": {"strokes": 5, "width": 3}}
    apart = {"config": config, "means": summarize([row("a", "selfreg", 0.8), row("b", "rf", 0.55)])}
    assert not any("margin" in line for line in table(apart))
    together = {"config": config, "means": summarize([row("a", "selfreg", 0.8), row("a", "rf", 0.55)])}
    assert any("margin +25.0 points" in line for line in table(together))


def test_an_image_a_method_failed_on_keeps_the_interactive_goal_from_reading_met():
    from napari_selfreg.bench.interactive import summarize

    def row(image, method, dice, budget="none"):
        return {"dataset": "monuseg", "image": image, "method": method, "budget": budget, "seed": 0,
                "dice": dice, "iou": dice / 2}

    rows = [row("a", "selfreg", 0.9, "60s"), row("b", "selfreg", 0.9, "60s"), row("a", "otsu", 0.7),
            row("b", "otsu", 0.7), row("c", "otsu", 0.8)]
    (goal,) = summarize(rows)["goal"]
    assert goal["images"] == 2 and goal["met"]  # c was not planned for SelfReg: no failure
    failed = [{"dataset": "monuseg", "image": "c", "method": "selfreg", "budget": "60s", "seed": 0,
               "protocol": "interactive", "error": "InputError: training diverged"}]
    (goal,) = summarize(rows, failed)["goal"]
    assert goal["failed_images"] == ["c"] and not goal["met"]
    other_budget = [{**failed[0], "budget": "30s"}]
    assert summarize(rows, other_budget)["goal"][0]["met"]
