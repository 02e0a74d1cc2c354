"""The benchmark harness works and resumes (CPU smoke runs; the figures are not checked here)."""

from __future__ import annotations

import json

import numpy as np
import pytest

from napari_selfreg.bench.__main__ import main
from napari_selfreg.bench.harness import (
    RunKey,
    SettingsMismatch,
    StateFile,
    Task,
    default_state_path,
    measure,
    note_progress,
    run_tasks,
    seed_state_from_results,
)


def _task(name: str, calls: list[str], fail: bool = False) -> Task:
    def run():
        calls.append(name)
        if fail:
            raise RuntimeError("boom")
        return {"dice": 0.5}

    return Task(RunKey("interactive", "monuseg", name, "otsu", "none", 0), run)


def test_harness_records_and_resumes(tmp_path):
    state = StateFile(tmp_path / "state.jsonl")
    calls: list[str] = []
    rows = run_tasks([_task("a", calls), _task("b", calls, fail=True)], state, progress=False)
    assert calls == ["a", "b"]
    assert rows[0]["dice"] == 0.5 and {"wall_s", "cpu_s", "peak_rss_mb"} <= rows[0].keys()
    assert "boom" in rows[1]["error"]
    # a torn last line (crash mid-write) is ignored
    with state.path.open("a") as handle:
        handle.write('{"protocol": "interac')
    calls.clear()
    rows = run_tasks([_task("a", calls), _task("b", calls)], state, progress=False)
    assert calls == ["b"], "finished runs must be skipped and failed ones retried"
    assert all("error" not in r for r in rows)


def test_a_resume_with_other_settings_is_refused_before_any_run(tmp_path):
    """Rows made with other settings would share one table with this command's rows."""
    state = StateFile(tmp_path / "state.jsonl")
    calls: list[str] = []

    def task(name, settings, method="selfreg", unrecorded=None):
        done = _task(name, calls)
        key = RunKey("interactive", "monuseg", name, method, "60s", 0)
        return Task(key, done.run, settings, unrecorded or {})

    run_tasks([task("a", {"lr": 0.001, "strokes": {"width": 5}})], state, progress=False)
    assert _lines(state.path)[0]["settings"] == {"lr": 0.001, "strokes": {"width": 5}}
    with pytest.raises(SettingsMismatch, match=r"lr = 0\.001.*asks 0\.01"):
        run_tasks([task("b", {"lr": 0.01, "strokes": {"width": 5}})], state, progress=False)
    assert calls == ["a"], "nothing runs once a difference is found"
    run_tasks([task("a", {"lr": 0.001, "strokes": {"width": 5}}), task("b", {"lr": 0.001})], state, progress=False)
    assert calls == ["a", "b"]
    # another method's rows are not this method's business
    run_tasks([task("c", {"lr": 0.5}, method="unet")], state, progress=False)
    assert calls == ["a", "b", "c"]
    # a row from before a setting was recorded: its top-level fact, else the code's value then
    state.append({**RunKey("interactive", "monuseg", "old", "selfreg", "60s", 0).to_dict(), "dice": 0.7})
    settings = {"lr": 0.001, "validation_fraction": 0.0}
    with pytest.raises(SettingsMismatch, match=r"validation_fraction = 0\.2"):
        run_tasks([task("d", settings, unrecorded={"validation_fraction": 0.2})], state, progress=False)
    run_tasks([task("d", settings)], state, progress=False)  # unknown either way: not held against it
    assert calls == ["a", "b", "c", "d"]


def test_the_committed_paper_runs_are_not_taken_for_runs_of_other_settings_or_devices(tmp_path):
    """The committed paper rows predate recorded settings: a rerun at another width, or on a
    GPU under the CPU runs' label (60ep-bf16), found every run finished and wrote the old
    figures under its own config."""
    from pathlib import Path

    from napari_selfreg.bench.harness import check_settings
    from napari_selfreg.bench.paper_protocol import UNRECORDED, PaperConfig, Schedule, run_settings

    committed = Path(__file__).resolve().parents[1] / "benchmarks" / "results" / "paper_protocol.json"
    rows = json.loads(committed.read_text())["runs"]
    cpu = next(r for r in rows if r["device"] == "cpu" and r["budget"] == "60ep-bf16")
    assert "settings" not in cpu  # what the fallback is for
    done = {"row": cpu}

    def task(config, device):
        schedule = Schedule(60, None, None, device, "bfloat16")
        assert schedule.label() == cpu["budget"]
        key = RunKey("paper", cpu["dataset"], "test-set", cpu["method"], schedule.label(), cpu["seed"])
        return Task(key, lambda: {}, run_settings(config, schedule), UNRECORDED)

    check_settings([task(PaperConfig(), "cpu")], done, tmp_path)  # the committed command: resumed
    with pytest.raises(SettingsMismatch, match=r"base_channels = 64.*asks 16"):
        check_settings([task(PaperConfig(base_channels=16), "cpu")], done, tmp_path)
    with pytest.raises(SettingsMismatch, match=r"device = 'cpu'.*asks 'cuda'"):
        check_settings([task(PaperConfig(), "cuda:0")], done, tmp_path)


def test_the_committed_cpu_and_gpu_paper_rows_resume_under_their_own_commands(tmp_path):
    """paper_protocol.json holds the GPU's 1000-epoch rows beside the CPU's 20- and 60-epoch
    ones; every committed CPU command was refused because a GPU row of another budget said
    device = 'cuda'. The device is held only against rows of the task's own budget."""
    from pathlib import Path

    from napari_selfreg.bench.harness import check_settings
    from napari_selfreg.bench.paper_protocol import PER_BUDGET, UNRECORDED, PaperConfig, Schedule, run_settings

    committed = Path(__file__).resolve().parents[1] / "benchmarks" / "results" / "paper_protocol.json"
    rows = json.loads(committed.read_text())["runs"]
    assert {(r["budget"], r["device"]) for r in rows} >= {("20ep", "cpu"), ("1000ep-bf16", "cuda")}
    done = {str(i): row for i, row in enumerate(rows)}

    def task(config, schedule):
        key = RunKey("paper", "monuseg", "test-set", "unet", schedule.label(), 0)
        return Task(key, lambda: {}, run_settings(config, schedule), UNRECORDED, PER_BUDGET)

    cpu_20 = Schedule(20, None, None, "cpu", "float32")
    assert cpu_20.label() == "20ep"
    check_settings([task(PaperConfig(), cpu_20)], done, tmp_path)
    check_settings([task(PaperConfig(), Schedule(60, None, None, "cpu", "bfloat16"))], done, tmp_path)
    with pytest.raises(SettingsMismatch, match=r"device = 'cpu'.*asks 'cuda'"):
        check_settings([task(PaperConfig(), Schedule(20, None, None, "cuda", "float32"))], done, tmp_path)
    with pytest.raises(SettingsMismatch, match=r"base_channels = 64.*asks 16"):  # still held file-wide
        check_settings([task(PaperConfig(base_channels=16), cpu_20)], done, tmp_path)


def test_paper_means_keep_a_gpus_and_a_cpus_runs_of_one_label_apart():
    from napari_selfreg.bench.paper_protocol import aggregate

    def row(seed, device, dice):
        return {**RunKey("paper", "glas", "test-set", "unet", "60ep-bf16", seed).to_dict(), "device": device,
                "dice_224": dice, "iou_224": dice, "dice_native": dice, "iou_native": dice, "epochs": 60,
                "train_s": 1.0, "schedule": "s"}

    results = aggregate([row(0, "cpu", 0.5), row(1, "cuda", 0.9), row(2, "cuda", 0.7)])
    by_device = {(r["device"], r["resolution"]): r for r in results}
    assert by_device["cpu", "224"]["seeds"] == 1 and by_device["cpu", "224"]["dice"] == 0.5
    assert by_device["cuda", "224"]["seeds"] == 2 and by_device["cuda", "224"]["dice"] == pytest.approx(0.8)


def test_merging_a_leases_runs_refuses_runs_of_other_settings(tmp_path):
    """merge_paper_runs.py pooled rows of another width under one mean ± std."""
    import importlib.util
    from dataclasses import asdict
    from pathlib import Path

    from napari_selfreg.bench.paper_protocol import PaperConfig, paper_document, run_settings

    script = Path(__file__).resolve().parents[1] / "benchmarks" / "gpu" / "merge_paper_runs.py"
    spec = importlib.util.spec_from_file_location("merge_paper_runs", script)
    merge = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(merge)

    def row(seed, config):
        return {**RunKey("paper", "glas", "test-set", "unet", "1000ep-bf16", seed).to_dict(), "device": "cuda",
                "dice_224": 0.8, "iou_224": 0.7, "dice_native": 0.8, "iou_native": 0.7, "epochs": 90,
                "train_s": 1.0, "schedule": "s", "settings": run_settings(config)}

    out = tmp_path / "paper_protocol.json"
    out.write_text(json.dumps(paper_document(PaperConfig(), [row(0, PaperConfig())], {})))
    before = out.read_text()
    lease = StateFile(tmp_path / "lease.state.jsonl")
    lease.append(row(1, PaperConfig(base_channels=16)))
    assert merge.main([str(lease.path), "--out", str(out), "--state", str(tmp_path / "s.jsonl")]) == 2
    assert out.read_text() == before
    lease.path.unlink()
    lease.append(row(1, PaperConfig()))
    assert merge.main([str(lease.path), "--out", str(out), "--state", str(tmp_path / "s.jsonl")]) == 0
    assert json.loads(out.read_text())["results"][0]["seeds"] == 2
    # a new result file takes the settings of the runs it is made of
    fresh = tmp_path / "small.json"
    small = StateFile(tmp_path / "small.state.jsonl")
    small.append(row(0, PaperConfig(base_channels=16)))
    document = merge.merge(fresh, [small.path], state_path=tmp_path / "small.s.jsonl")
    assert document["config"]["base_channels"] == 16 and asdict(PaperConfig())["base_channels"] == 64


def test_a_long_run_shows_how_far_it_is_on_the_progress_bar(tmp_path, capsys):
    def run():
        note_progress("epoch 3/60, val Dice 0.812")
        return {"dice": 0.5}

    note_progress("outside any run")  # nothing to update: must not fail
    task = Task(RunKey("paper", "glas", "test-set", "unet", "60ep", 0), run)
    run_tasks([task], StateFile(tmp_path / "state.jsonl"), progress=True)
    assert "glas/test-set/unet/60ep epoch 3/60, val Dice 0.812" in capsys.readouterr().err


def test_a_fresh_clone_resumes_from_the_committed_results(tmp_path):
    """No state file (benchmarks/runs is not in git): the finished runs come from the result file."""
    out = tmp_path / "results" / "interactive.json"
    out.parent.mkdir()
    finished = {**RunKey("interactive", "monuseg", "a", "otsu", "none", 0).to_dict(), "dice": 0.7}
    failed = {**RunKey("interactive", "monuseg", "b", "otsu", "none", 0).to_dict(), "error": "boom"}
    out.write_text(json.dumps({"protocol": "interactive", "rows": [finished, failed], "means": []}))
    state = StateFile(default_state_path(out))
    assert seed_state_from_results(state, out) == 1
    calls: list[str] = []
    rows = run_tasks([_task("a", calls), _task("b", calls), _task("c", calls)], state, progress=False)
    assert calls == ["b", "c"], "the committed run must be kept, the failed one retried"
    assert {r["image"]: r["dice"] for r in rows} == {"a": 0.7, "b": 0.5, "c": 0.5}
    assert seed_state_from_results(state, out) == 0, "an existing state file is never overwritten"
    assert len(state.load()) == 3


@pytest.mark.parametrize("text", ['{"rows": [', "[1, 2]"])
def test_a_broken_result_file_is_named_not_overwritten(tmp_path, capsys, text):
    out = tmp_path / "interactive.json"
    out.write_text(text)
    with pytest.raises(ValueError, match=r"interactive\.json"):
        seed_state_from_results(StateFile(default_state_path(out)), out)
    assert main(["interactive", "--out", str(out), "--images", "1", "--no-progress"]) == 2
    assert "interactive.json" in capsys.readouterr().err
    assert out.read_text() == text and not default_state_path(out).exists()


def test_measure_and_state_path(tmp_path):
    result = measure(lambda: {"x": 1})
    assert result["x"] == 1 and result["wall_s"] >= 0 and result["peak_rss_mb"] > 0
    assert default_state_path("benchmarks/results/interactive.json").as_posix() == \
        "benchmarks/runs/interactive.state.jsonl"
    assert default_state_path(tmp_path / "x.json") == tmp_path / "x.state.jsonl"


def test_summaries_order_budgets_by_size_not_text():
    from napari_selfreg.bench.interactive import budget_order, summarize

    assert sorted(["120s", "none", "30s", "200steps", "60s"], key=budget_order) == [
        "none", "200steps", "30s", "60s", "120s"]
    rows = [{"dataset": "d", "method": method, "budget": budget, "image": "a", "seed": 0, "dice": dice, "iou": dice}
            for method, budget, dice in [("selfreg", "120s", 0.8), ("selfreg", "30s", 0.6), ("rf", "none", 0.7)]]
    summary = summarize(rows)
    assert [m["budget"] for m in summary["means"] if m["method"] == "selfreg"] == ["30s", "120s"]
    assert [round(g["margin"], 6) for g in summary["goal"]] == [-0.1, 0.1]


def test_missing_data_skips_cleanly(tmp_path, capsys):
    code = main(["interactive", "--smoke", "--data", str(tmp_path / "nowhere"), "--out", str(tmp_path / "i.json"),
                 "--no-progress"])
    assert code == 2
    assert "not found" in capsys.readouterr().err


@pytest.mark.parametrize("budget", ["-1", "0", "5x"])
def test_a_bad_budget_is_a_usage_error(budget, tmp_path, capsys):
    with pytest.raises(SystemExit) as stop:
        main(["interactive", "--budgets", budget, "--out", str(tmp_path / "i.json")])
    assert stop.value.code == 2
    assert "--budgets" in capsys.readouterr().err
    assert not (tmp_path / "i.json").exists()


def test_an_output_folder_is_refused_before_any_run(tmp_path, capsys):
    """It used to run every method, then fail to write the result with a traceback."""
    folder = tmp_path / "results"
    folder.mkdir()
    assert main(["interactive", "--out", str(folder), "--images", "1", "--no-progress"]) == 2
    assert "is a folder" in capsys.readouterr().err
    assert list(folder.iterdir()) == []


def test_failed_runs_are_reported_beside_the_table(tmp_path, capsys):
    from napari_selfreg.bench.harness import RunKey, Task, run_tasks

    def broken():
        raise ImportError("No module named 'sklearn'")

    key = RunKey(protocol="interactive", dataset="d", image="img", method="rf", budget="none", seed=0)
    rows = run_tasks([Task(key, broken)], StateFile(tmp_path / "s.jsonl"), progress=False)
    assert "error" in rows[0]
    assert "1 of 1 runs failed" in capsys.readouterr().err


def _lines(path):
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


@pytest.mark.data
@pytest.mark.slow
def test_interactive_smoke_and_resume(shared_data, tmp_path, capsys):
    out, state = tmp_path / "interactive.json", tmp_path / "interactive.state.jsonl"
    argv = ["interactive", "--smoke", "--dataset", "monuseg", "--methods", "selfreg,transfer,rf,otsu",
            "--data", str(shared_data), "--out", str(out), "--no-progress"]
    assert main(argv) == 0
    document = json.loads(out.read_text())
    assert {"rows", "means", "goal", "config", "environment"} <= document.keys()
    rows = [r for r in document["rows"] if r["method"] != "pretrain"]
    assert len({r["image"] for r in rows}) == 2
    assert {r["method"] for r in rows} == {"selfreg", "transfer", "rf", "otsu"}
    for row in rows:
        assert 0.0 <= row["dice"] <= 1.0 and row["wall_s"] > 0 and row["peak_rss_mb"] > 0
        assert row["stroke_fraction"] < 0.01
        if row["method"] in ("selfreg", "transfer"):  # the kept weights, and with flips
            # every stroke trains the networks, as it does the baselines: no held-out strokes, so
            # no best weights other than the last
            assert row["validation_fraction"] == 0.0 and row["best_val_dice"] is None
            assert row["kept"] == "last" and "dice_best" not in row
            assert 0.0 <= row["dice_flips"] <= 1.0
            assert not any(k.startswith("_") for k in row)  # label arrays are scored, not stored
    selfreg = next(m for m in document["means"] if m["method"] == "selfreg")
    assert "dice_flips" in selfreg and "dice_best" not in selfreg
    assert {(m["method"], m["budget"]) for m in document["means"]} >= {("selfreg", "2s"), ("rf", "none")}
    assert document["goal"] and document["goal"][0]["budget"] == "2s"

    first = _lines(state)
    assert main(argv) == 0  # everything finished: nothing runs again
    assert _lines(state) == first

    state.write_text("\n".join(json.dumps(r) for r in first[:-1]) + "\n")  # forget the last run
    assert main(argv) == 0
    again = _lines(state)
    assert again[:-1] == first[:-1] and len(again) == len(first)
    key = ("image", "method", "budget", "seed")
    assert tuple(again[-1][k] for k in key) == tuple(first[-1][k] for k in key)

    # the same runs with 20 % held out would be mixed into this table: refused, nothing runs
    assert main([*argv, "--validation-fraction", "0.2"]) == 2
    assert "validation_fraction = 0.0" in capsys.readouterr().err
    assert _lines(state) == again


@pytest.mark.data
@pytest.mark.slow
def test_correction_smoke_scores_every_round(shared_data, tmp_path):
    out = tmp_path / "correction.json"
    argv = ["correction", "--smoke", "--dataset", "monuseg", "--methods", "selfreg,rf,otsu",
            "--data", str(shared_data), "--out", str(out), "--no-progress"]
    assert main(argv) == 0
    document = json.loads(out.read_text())
    rows = document["rows"]
    assert {r["method"] for r in rows} == {"selfreg", "rf", "otsu"} and len(rows) == 6
    for row in rows:
        assert len(row["rounds"]) == 2 and row["dice"] == row["rounds"][-1]["dice"]
        assert all(0.0 <= r["dice"] <= 1.0 for r in row["rounds"])
        first, second = (r["stroke_fraction"] for r in row["rounds"])
        assert second >= first  # correction strokes are added, never removed
        if row["method"] == "selfreg":
            assert all(r["steps"] > 0 for r in row["rounds"])
    assert any(r["rounds"][1]["stroke_fraction"] > r["rounds"][0]["stroke_fraction"] for r in rows)
    means = {m["method"]: m for m in document["means"]}
    assert len(means["selfreg"]["dice_per_round"]) == 2


@pytest.mark.data
@pytest.mark.slow
def test_paper_smoke_and_resume(shared_data, tmp_path):
    out, state = tmp_path / "paper_protocol.json", tmp_path / "paper_protocol.state.jsonl"
    argv = ["paper", "--smoke", "--dataset", "monuseg", "--data", str(shared_data), "--out", str(out),
            "--device", "cpu", "--no-progress"]
    assert main(argv) == 0
    results = json.loads(out.read_text())["results"]
    assert {(r["model"], r["resolution"]) for r in results} == {
        (m, res) for m in ("unet", "selfreg_unet") for res in ("224", "native")
    }
    for r in results:
        assert {"dataset", "dice", "dice_std", "iou", "iou_std", "seeds", "schedule", "device"} <= r.keys()
        assert r["dataset"] == "monuseg" and r["device"] == "cpu" and r["cpu_schedule"]
        assert 0.0 <= r["dice"] <= 1.0
    first = _lines(state)
    assert len(first) == 2
    document = json.loads(out.read_text())
    out.write_text(json.dumps({**document, "note": "rows on cuda: a lent GPU"}))  # as merge_paper_runs.py leaves it
    assert main(argv) == 0
    assert _lines(state) == first
    assert json.loads(out.read_text())["note"] == "rows on cuda: a lent GPU"  # a later run keeps the note


@pytest.mark.data
@pytest.mark.slow
def test_the_lease_scripts_run_seeds_side_by_side_and_merge_them(shared_data, tmp_path):
    """benchmarks/gpu/paper_runs.sh (here on the CPU, smoke-sized) and merge_paper_runs.py, as a lease uses them."""
    import importlib.util
    import os
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    runs = tmp_path / "runs"
    env = {**os.environ, "RUNS": str(runs), "SEEDS": "0 1", "DEVICE": "cpu", "DATA": str(shared_data),
           "EXTRA": "--smoke --no-progress", "POLL_S": "1", "PYTHON": sys.executable, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(["bash", str(root / "benchmarks" / "gpu" / "paper_runs.sh"), "glas", "300"], cwd=root,
                          env=env, capture_output=True, text=True, timeout=400)
    assert done.returncode == 0, done.stderr
    gathered = runs / "gpu_runs.state.jsonl"
    keys = {(r["method"], r["seed"]) for r in _lines(gathered)}
    assert keys == {(m, s) for m in ("unet", "selfreg_unet") for s in (0, 1)}, done.stdout
    # a second call starts nothing: every run has its log
    again = subprocess.run(["bash", str(root / "benchmarks" / "gpu" / "paper_runs.sh"), "glas", "300"], cwd=root,
                           env=env, capture_output=True, text=True, timeout=60)
    assert "started" not in again.stdout and len(_lines(gathered)) == 4

    script = root / "benchmarks" / "gpu" / "merge_paper_runs.py"
    spec = importlib.util.spec_from_file_location("merge_paper_runs", script)
    merge = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(merge)
    out = tmp_path / "paper_protocol.json"
    document = merge.merge(out, [gathered], note="smoke", state_path=tmp_path / "merged.state.jsonl")
    assert {(r["model"], r["resolution"], r["seeds"]) for r in document["results"]} == {
        (m, res, 2) for m in ("unet", "selfreg_unet") for res in ("224", "native")
    }
    assert json.loads(out.read_text())["note"] == "smoke"


def test_speed_benchmark_smoke_run_writes_its_ratios(tmp_path):
    """benchmarks/bench_speed.py --quick: every comparison runs and the ratios are consistent."""
    import importlib.util
    from pathlib import Path

    script = Path(__file__).resolve().parent.parent / "benchmarks" / "bench_speed.py"
    spec = importlib.util.spec_from_file_location("bench_speed", script)
    bench_speed = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench_speed)
    out = tmp_path / "speed.json"
    assert bench_speed.main(["--quick", "--out", str(out)]) == 0
    doc = json.loads(out.read_text())
    (run,) = doc["runs"]
    training = run["training"]
    for variant in ("plain_float32", "fast", "fast_without_selfreg"):
        assert training[variant]["steps_per_s"] > 0
    assert training["selfreg_overhead_ratio"] == pytest.approx(
        training["fast"]["median_s"] / training["fast_without_selfreg"]["median_s"]
    )
    assert training["selfreg_overhead_ratio_of_minimums"] == pytest.approx(
        training["fast"]["min_s"] / training["fast_without_selfreg"]["min_s"]
    )
    ceiling = training["ceiling"]  # a step's FLOPs at the bf16 matmul peak bound any speed-up
    assert training["gflop_per_step"] > 0
    floor = training["gflop_per_step"] / run["matmul"]["bfloat16"]["gflops_median"]
    assert ceiling["floor_at_bf16_matmul_peak_s"] == pytest.approx(floor)
    assert ceiling["speedup_ceiling"] == pytest.approx(training["plain_float32"]["median_s"] / floor)
    assert ceiling["fast_fraction_of_bf16_matmul_peak"] == pytest.approx(floor / training["fast"]["median_s"])
    prediction = run["prediction"]
    assert prediction["agreement_vs_plain"]["label_agreement"] > 0.99
    pristine = prediction["plain_float32_pristine_process"]  # timed by the worker process
    assert pristine["n"] == prediction["fast"]["n"] and pristine["median_s"] > 0
    ratio = pristine["median_s"] / prediction["fast"]["median_s"]
    assert prediction["speedup_median_vs_pristine"] == pytest.approx(ratio)
    assert abs(doc["training_agreement"]["loss_relative_difference"]) < 0.05


def _script(name: str):
    from pathlib import Path

    return Path(__file__).resolve().parent.parent / "benchmarks" / name


def test_batch_benchmark_smoke_run_compares_like_with_like(shared_data, tmp_path, monkeypatch):
    """benchmarks/bench_batch.py on two images: both ways write the same labels, and the ratio
    is the one of the times it reports."""
    import subprocess
    import sys

    monkeypatch.setenv("SELFREG_SHARED_DATA", str(shared_data))
    out = tmp_path / "batch.json"
    subprocess.run([sys.executable, str(_script("bench_batch.py")), "--images", "2", "--repeats", "1",
                    "--out", str(out)], check=True, capture_output=True)
    doc = json.loads(out.read_text())
    (run,) = doc["runs"]
    assert len(doc["images"]) == 2 and run["same_labels"] is True
    assert run["ratio"] == pytest.approx(run["run_per_image_s"] / run["one_run_s"])
    assert run["one_run_s"] > 0


def test_instance_slide_benchmark_smoke_run_checks_against_the_whole_map(shared_data, tmp_path, monkeypatch):
    """benchmarks/bench_instances.py --slide: a map of several windows, split in a child process,
    gives the objects of the whole map's split; napari-selfreg measure tables each of them."""
    import subprocess
    import sys

    monkeypatch.setenv("SELFREG_SHARED_DATA", str(shared_data))
    out = tmp_path / "slide.json"
    subprocess.run([sys.executable, str(_script("bench_instances.py")), "--slide", "1500", "--tile", "512",
                    "--check", "--measure-cli", "--out", str(out)], check=True, capture_output=True)
    row = json.loads(out.read_text())["result"]
    assert row["windows"] == 9 and row["same_objects"] is True
    assert row["cli_exit_code"] == 0 and row["cli_objects"] == row["objects"]  # measure on the saved TIFFs
    assert row["objects"] == row["whole_map_objects"] > 500 and row["truncated"] == 0
    assert row["peak_rss_bytes"] >= row["peak_rss_before_split_bytes"] > 0
    assert row["measured_objects"] == row["objects"] and row["measure_seconds"] > 0  # the table of every object


def test_slide_benchmark_smoke_run_predicts_and_counts_objects(shared_data, tmp_path, monkeypatch):
    """benchmarks/bench_slide.py: train, then predict --instances of a slide, from the command line."""
    import subprocess
    import sys

    monkeypatch.setenv("SELFREG_SHARED_DATA", str(shared_data))
    out = tmp_path / "slide.json"
    subprocess.run([sys.executable, str(_script("bench_slide.py")), "--size", "1200", "--train-seconds", "3",
                    "--out", str(out)], check=True, capture_output=True)
    row = json.loads(out.read_text())["result"]
    assert sum(row["pixels_per_label"].values()) == 1200 * 1200
    assert row["instances"] == sum(row["instances_per_label"].values())
    assert set(row["output_bytes"]) == {"labels.tif", "instances.tif"} and row["peak_rss_bytes"] > 0


def test_supervised_benchmark_smoke_run_trains_once_and_scores_like_the_protocol(shared_data, tmp_path):
    """benchmarks/bench_supervised.py: the model is trained once and reused; its Otsu column is
    the interactive protocol's baseline on the same strokes (results/baselines.json)."""
    import subprocess
    import sys

    argv = [sys.executable, str(_script("bench_supervised.py")), "--steps", "2", "--threads", "1", "--images", "2",
            "--data", str(shared_data), "--runs", str(tmp_path / "runs")]
    first, second = tmp_path / "first.json", tmp_path / "second.json"
    subprocess.run([*argv, "--out", str(first)], check=True, capture_output=True, timeout=600)
    subprocess.run([*argv, "--fine-tune-seconds", "1", "--out", str(second)], check=True, capture_output=True,
                   timeout=600)
    one, two = json.loads(first.read_text()), json.loads(second.read_text())
    assert one["train"]["cached"] is False and one["train"]["steps"] == 2 and one["train"]["train_images"] == 24
    assert two["train"]["cached"] is True and (tmp_path / "runs" / one["train"]["model_file"]).is_file()
    assert [r["supervised"] for r in two["rows"]] == [r["supervised"] for r in one["rows"]]
    assert all(r["fine_tune_steps"] >= 1 and 0 <= r["fine_tuned"]["dice"] <= 100 for r in two["rows"])
    baselines = json.loads((_script("results") / "baselines.json").read_text())["rows"]
    for row, baseline in zip(one["rows"], baselines, strict=False):
        assert row["image"] == baseline["image"]
        assert row["otsu"]["dice"] == pytest.approx(100 * baseline["otsu_smoothed"], abs=0.006)
    assert one["mean_dice"]["otsu"] == pytest.approx(np.mean([r["otsu"]["dice"] for r in one["rows"]]), abs=0.006)


@pytest.mark.gui
def test_gui_benchmark_smoke_run_records_every_phase(tmp_path):
    """benchmarks/bench_gui.py with a few steps: each phase ran to its end and was timed."""
    import subprocess
    import sys

    out = tmp_path / "gui.json"
    subprocess.run([sys.executable, str(_script("bench_gui.py")), "--steps", "3", "--out", str(out)],
                   check=True, capture_output=True, timeout=600)
    phases = json.loads(out.read_text())["phases"]
    assert set(phases) == {"idle", "train", "redundancy", "segment"}
    assert phases["train"]["steps"] == 3 and phases["redundancy"]["layers"] > 0
    for phase in phases.values():
        assert phase["ticks"] > 0 and phase["max_gap_ms"] >= phase["median_gap_ms"] > 0


@pytest.mark.gui
def test_measurement_colours_benchmark_smoke_run(tmp_path):
    """benchmarks/bench_measurement_colours.py on a small grid: the grid's objects were separated
    and measured, and each timing is recorded."""
    import subprocess
    import sys

    out = tmp_path / "colours.json"
    ran = subprocess.run([sys.executable, str(_script("bench_measurement_colours.py")), "--cells", "12",
                          "--repeats", "1", "--out", str(out)], capture_output=True, text=True, timeout=600)
    assert ran.returncode == 0, ran.stderr[-3000:]
    result = json.loads(out.read_text())
    assert 0.9 * 12 * 12 < result["objects"] <= 12 * 12 and result["columns"][:2] == ["area_px", "circularity"]
    assert "--cells 12" in result["command"] and "coloured by area_px: dark" in ran.stdout
    for phase in ("values", "choose", "draw_extra"):
        assert result[phase]["max_s"] >= result[phase]["median_s"]


def test_the_pretrained_cache_is_per_pretraining_setting(tmp_path):
    """A run with another learning rate fine-tuned the model pretrained at the old one."""
    from dataclasses import replace

    from napari_selfreg.bench.interactive import InteractiveConfig, _pretrained_path

    config = InteractiveConfig(cache_dir=str(tmp_path))
    same = InteractiveConfig(cache_dir=str(tmp_path))
    assert _pretrained_path(config, "glas", 0) == _pretrained_path(same, "glas", 0)
    others = [replace(config, learning_rate=3e-3), replace(config, batch_size=config.batch_size * 2),
              replace(config, transfer_patch_size=config.transfer_patch_size * 2)]
    paths = {_pretrained_path(c, "glas", 0) for c in [config, *others]}
    assert len(paths) == 4


def _bench_uncertainty():
    import importlib.util
    from pathlib import Path

    script = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_uncertainty.py"
    spec = importlib.util.spec_from_file_location("bench_uncertainty", script)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_uncertainty_figures_count_ties_fairly():
    bench = _bench_uncertainty()
    rng = np.random.default_rng(0)
    score = rng.integers(0, 5, 1000).astype(float)  # many ties, as a distance map has
    wrong = rng.random(1000) < 0.2 + 0.1 * score
    pairs = score[wrong][:, None] - score[~wrong][None, :]
    assert bench.auroc(score, wrong) == pytest.approx((pairs > 0).mean() + 0.5 * (pairs == 0).mean())
    assert bench.auroc(score, np.zeros(1000, bool)) is None
    top = bench.top_share(np.zeros(1000), wrong, 0.1)  # one big tie: what a random choice gets
    assert top["captured"] == pytest.approx(0.1)
    assert top["error_rate_in"] == pytest.approx(top["error_rate_out"]) == pytest.approx(wrong.mean())
    exact = bench.top_share(np.arange(1000.0), np.arange(1000) >= 950, 0.1)
    assert exact["captured"] == 1.0 and exact["error_rate_in"] == 0.5 and exact["error_rate_out"] == 0.0


def test_uncertainty_strokes_are_labelled_from_the_truth_and_spread():
    from napari_selfreg.bench.strokes import CorrectionConfig

    truth = np.zeros((120, 120), bool)
    truth[20:60, 20:100] = True
    priority = np.zeros(truth.shape)
    priority[30:50, 30:90] = 1.0  # inside the object: the structure strokes start there
    for where in (priority, None):
        labels = _bench_uncertainty().placed_strokes(truth, where, 0, CorrectionConfig(strokes=3, length=10))
        assert set(np.unique(labels)) <= {0, 1, 2}
        assert not (labels == 2)[~truth].any() and not (labels == 1)[truth].any()
        assert 0 < (labels > 0).sum() <= 3 * 10 * 9  # 3 walks of 10 pixels, a 9-pixel brush
    assert (labels > 0).any()


def test_bench_uncertainty_without_data_exits_2(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("SELFREG_SHARED_DATA", str(tmp_path))
    assert _bench_uncertainty().main(["--images", "1", "--out", str(tmp_path / "u.json")]) == 2
    assert "not found" in capsys.readouterr().err and not (tmp_path / "u.json").exists()


@pytest.mark.data
@pytest.mark.slow
def test_bench_uncertainty_smoke(shared_data, tmp_path):
    out = tmp_path / "u.json"
    argv = ["--images", "1", "--crop", "96", "--steps", "2", "--second-round-steps", "1", "--threads", "1",
            "--data", str(shared_data), "--out", str(out)]
    assert _bench_uncertainty().main(argv) == 0
    row = json.loads(out.read_text())["rows"][0]
    assert row["labels_as_run"] and row["steps"] == 2 and 0 <= row["captured_top10"] <= 1
    assert set(row["second_round"]) == {"extra_steps_only", "uncertain", "random", "on_mistakes"}
