"""Unattended, resumable benchmark runs with wall time and peak memory per run.

Benchmarks here take hours on a CPU; a crash or a reboot must not lose what is done.
Every finished run is appended (and flushed) as one JSON line to a state file, keyed by
(protocol, dataset, image, method, budget, seed); a rerun skips the keys it finds. The
settings a run's result also depends on are recorded beside it, and a rerun with other
settings is refused: its rows would otherwise be mixed with the old ones in one table.
"""

from __future__ import annotations

import json
import os
import platform
import sys
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

KEY_FIELDS = ("protocol", "dataset", "image", "method", "budget", "seed")


@dataclass(frozen=True)
class RunKey:
    protocol: str
    dataset: str
    image: str
    method: str
    budget: str  # "60s", "500steps", ... (a string so that step and time budgets share the field)
    seed: int

    def id(self) -> str:
        return "|".join(str(getattr(self, f)) for f in KEY_FIELDS)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class Task:
    """One run: its key, the function that performs it (returns the metrics as a dict), and
    the settings besides the key that decide its result (JSON values, recorded in its row)."""

    key: RunKey
    run: Callable[[], dict[str, Any]]
    settings: dict[str, Any] = field(default_factory=dict)
    # what rows made before a setting was recorded ran with (their code's fixed value)
    unrecorded: dict[str, Any] = field(default_factory=dict)
    # settings that may differ between budgets of one file (the paper's device: its GPU and
    # CPU schedules share a file), held only against rows of the task's own budget
    per_budget: frozenset[str] = frozenset()


class SettingsMismatch(ValueError):
    """The state file holds finished runs made with other settings than this command's."""


def _as_json(value: Any) -> Any:
    return json.loads(json.dumps(value))  # tuples and lists, ints and floats as a row stores them


def check_settings(tasks: Iterable[Task], done: dict[str, dict[str, Any]], state_path: Path) -> None:
    """Refuse to resume from rows of the same protocol and method made with other settings.

    A row is compared on its ``settings``; for the names in the task's ``unrecorded``, a
    row without them is compared on its top-level field of that name (the runs' facts kept
    some), else on the ``unrecorded`` value. A setting known neither way is not held
    against it, nor is a ``per_budget`` setting of a row of another budget.
    """
    by_method: dict[tuple[str, str], Task] = {}
    by_budget: dict[tuple[str, str, str], Task] = {}
    for task in tasks:
        by_method.setdefault((task.key.protocol, task.key.method), task)
        by_budget.setdefault((task.key.protocol, task.key.method, task.key.budget), task)
    for row in done.values():
        own = by_budget.get((row.get("protocol"), row.get("method"), row.get("budget")))
        task = own or by_method.get((row.get("protocol"), row.get("method")))
        if task is None or not task.settings:
            continue
        wanted = _as_json(task.settings)
        recorded = {**task.unrecorded, **{name: row[name] for name in task.unrecorded if name in row}}
        recorded.update(row.get("settings") or {})
        for name, value in wanted.items():
            if own is None and name in task.per_budget:
                continue
            if name in recorded and _as_json(recorded[name]) != value:
                raise SettingsMismatch(
                    f"{state_path} holds finished {row['method']} runs made with {name} = {recorded[name]!r} "
                    f"(e.g. {row['dataset']}/{row['image']}, {row['budget']}), and this command asks {value!r}; "
                    "give another --out (or --state), or delete that file to run them again"
                )


class StateFile:
    """Append-only JSONL of finished runs; a torn last line (a crash mid-write) is ignored."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)

    def load(self) -> dict[str, dict[str, Any]]:
        done: dict[str, dict[str, Any]] = {}
        if not self.path.is_file():
            return done
        for line in self.path.read_text().splitlines():
            line = line.strip()
            if not line:
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                continue
            if "error" not in row:
                done[RunKey(**{f: row[f] for f in KEY_FIELDS}).id()] = row
        return done

    def append(self, row: dict[str, Any]) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self.path.open("a") as handle:
            handle.write(json.dumps(row) + "\n")
            handle.flush()
            os.fsync(handle.fileno())


def _rss_bytes() -> int | None:
    try:
        import psutil
    except ImportError:
        return None
    return int(psutil.Process().memory_info().rss)


def _max_rss_bytes() -> int:
    """The process's lifetime peak RSS (never decreases, so it bounds but does not isolate a run)."""
    import resource

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(peak if sys.platform == "darwin" else peak * 1024)


class PeakMemory:
    """Samples the RSS in a background thread, so each run gets its own peak.

    Falls back to ``getrusage``'s lifetime peak when psutil is missing (then the peak
    of a run is an upper bound that includes earlier runs).
    """

    def __init__(self, interval: float = 0.05) -> None:
        self.interval = interval
        self.peak = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.source = "psutil" if _rss_bytes() is not None else "getrusage"

    def _sample(self) -> None:
        while not self._stop.is_set():
            rss = _rss_bytes()
            if rss is not None:
                self.peak = max(self.peak, rss)
            self._stop.wait(self.interval)

    def __enter__(self) -> PeakMemory:
        if self.source == "psutil":
            self.peak = _rss_bytes() or 0
            self._thread = threading.Thread(target=self._sample, daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
            self.peak = max(self.peak, _rss_bytes() or 0)
        else:
            self.peak = _max_rss_bytes()


def measure(run: Callable[[], dict[str, Any]]) -> dict[str, Any]:
    """Run and add wall time, process CPU time and peak RSS to its metrics."""
    cpu_start = time.process_time()
    start = time.perf_counter()
    with PeakMemory() as memory:
        metrics = run()
    return {
        **metrics,
        "wall_s": round(time.perf_counter() - start, 3),
        "cpu_s": round(time.process_time() - cpu_start, 3),
        "peak_rss_mb": round(memory.peak / 2**20, 1),
        "memory_source": memory.source,
    }


def environment() -> dict[str, Any]:
    """Where the figures come from: they mean little without the machine."""
    import torch

    info: dict[str, Any] = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
    }
    try:
        from .. import __version__

        info["napari_selfreg"] = __version__
    except ImportError:  # pragma: no cover
        pass
    return info


_BARS: list[tuple[Any, str]] = []  # the running bar and its run's name, while run_tasks runs


def note_progress(text: str) -> None:
    """Show how far the current run is (e.g. its epoch) beside its name on the progress bar.

    A paper-protocol run takes many minutes; without this the bar sits still for all of them.
    Does nothing outside ``run_tasks`` or with the bar disabled.
    """
    if _BARS:
        bar, name = _BARS[-1]
        bar.set_postfix_str(f"{name} {text}")


def run_tasks(
    tasks: Iterable[Task], state: StateFile, progress: bool = True, description: str = "bench"
) -> list[dict[str, Any]]:
    """Run every task whose key is not yet in ``state``; return all rows of these tasks (old and new).

    A failing run is recorded with its error (so an unattended run goes on); rows with an
    error do not count as finished, so the next invocation retries them.
    """
    from tqdm.auto import tqdm

    tasks = list(tasks)
    done = state.load()
    check_settings(tasks, done, state.path)
    rows: list[dict[str, Any]] = []
    todo = [t for t in tasks if t.key.id() not in done]
    skipped = len(tasks) - len(todo)
    bar = tqdm(total=len(tasks), initial=skipped, desc=description, disable=not progress, dynamic_ncols=True)
    finished: dict[str, dict[str, Any]] = {}
    for task in todo:
        name = f"{task.key.dataset}/{task.key.image[:16]}/{task.key.method}/{task.key.budget}"
        bar.set_postfix_str(name)
        _BARS.append((bar, name))
        try:
            result = measure(task.run)
        except Exception as error:  # recorded; the next runs go on
            result = {"error": f"{type(error).__name__}: {error}"}
        finally:
            _BARS.pop()
        row = {**task.key.to_dict(), **result, "finished_at": time.strftime("%Y-%m-%dT%H:%M:%S")}
        if task.settings:
            row["settings"] = task.settings
        state.append(row)
        finished[task.key.id()] = row
        bar.update(1)
    bar.close()
    failed = [row for row in finished.values() if "error" in row]
    if failed:  # said here too: a table without a method's rows must not pass unnoticed
        first = failed[0]
        print(f"{len(failed)} of {len(todo)} runs failed (retried when the command is repeated); first: "
              f"{first['method']} on {first['image']}: {first['error']}", file=sys.stderr)
    for task in tasks:
        rows.append(done.get(task.key.id()) or finished[task.key.id()])
    return rows


def write_json(path: str | Path, document: dict[str, Any]) -> Path:
    """Write through a temporary file so an interrupted write never leaves half a result."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".part")
    tmp.write_text(json.dumps(document, indent=2) + "\n")
    tmp.replace(path)
    return path


def default_state_path(out: str | Path) -> Path:
    """benchmarks/results/X.json keeps its state in benchmarks/runs/X.state.jsonl (git-ignored)."""
    out = Path(out)
    if out.parent.name == "results":
        return out.parent.parent / "runs" / f"{out.stem}.state.jsonl"
    return out.with_name(f"{out.stem}.state.jsonl")


def seed_state_from_results(state: StateFile, out: str | Path) -> int:
    """Start a missing state file from the finished runs kept in an existing result file.

    The state lives in git-ignored benchmarks/runs/, so a fresh clone has only the committed
    results. Without this the next run would redo every finished run, and a run over fewer
    images would rewrite the result file with its own rows alone. Returns the runs taken over.
    """
    out = Path(out)
    if state.path.exists() or not out.is_file():
        return 0
    try:
        document = json.loads(out.read_text())
    except json.JSONDecodeError as error:  # a torn write or a hand edit: say which file, do not guess
        raise ValueError(f"{out} is not valid JSON ({error}); restore it (git checkout) or give another --out"
                         ) from None
    if not isinstance(document, dict):
        raise ValueError(f"{out} is not a benchmark result file (expected a JSON object); give another --out")
    rows = [
        row for part in ("rows", "runs") for row in document.get(part, [])
        if isinstance(row, dict) and all(f in row for f in KEY_FIELDS) and "error" not in row
    ]
    if rows:
        state.path.parent.mkdir(parents=True, exist_ok=True)
        state.path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return len(rows)


def protocol_rows(state: StateFile, protocol: str) -> list[dict[str, Any]]:
    """The finished runs of one protocol, in a stable order (dataset, image, method, budget, seed)."""
    rows = [r for r in state.load().values() if r["protocol"] == protocol]
    rows.sort(key=lambda r: (r["dataset"], r["image"], r["method"], r["budget"], r["seed"]))
    return rows


def write_protocol(out: str | Path, protocol: str, units: str, config: Any, **parts: Any) -> dict[str, Any]:
    """A protocol's result document: what was run, on which machine, then its own parts; written atomically."""
    document = {"protocol": protocol, "units": units, "config": asdict(config), "environment": environment(), **parts}
    write_json(out, document)
    return document
