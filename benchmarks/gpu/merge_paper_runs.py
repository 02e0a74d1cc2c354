"""Merge paper-protocol runs made on another machine (a lent GPU) into a result file.

    python benchmarks/gpu/merge_paper_runs.py --out benchmarks/results/paper_protocol.json \\
        --note "cuda rows: ..." RUNS.state.jsonl [MORE.state.jsonl ...]

Why: the runs of a lease come back as state files (one JSON line per finished run, the
same rows `napari-selfreg bench paper` writes), made by processes that shared one GPU.
This adds the rows whose key the result does not hold yet, keeps every row it holds,
and recomputes the mean ± std. The result's settings and environment stay those of the
run that wrote it; the note says where the imported rows came from.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from napari_selfreg.bench.harness import (
    KEY_FIELDS,
    RunKey,
    SettingsMismatch,
    StateFile,
    default_state_path,
    seed_state_from_results,
    write_json,
)
from napari_selfreg.bench.paper_protocol import SETTING_NAMES, UNRECORDED, PaperConfig, paper_document, run_settings


def _key(row: dict) -> str:
    return RunKey(**{f: row[f] for f in KEY_FIELDS}).id()


def _settings(row: dict) -> dict:
    """The settings a row was made with (``UNRECORDED`` for rows from before they were recorded)."""
    recorded = {**UNRECORDED, **(row.get("settings") or {})}
    return {name: recorded[name] for name in SETTING_NAMES}


def merge(out: Path, sources: list[Path], note: str | None = None, state_path: Path | None = None) -> dict:
    """Raises ``SettingsMismatch`` (before writing anything) for rows made with other settings
    than the result's, which a mean over seeds would pool with them."""
    previous = json.loads(out.read_text()) if out.is_file() else {}
    imported = [row for source in sources for row in StateFile(source).load().values() if "error" not in row]
    if "config" in previous:
        config = PaperConfig(**previous["config"])
        expected, where = run_settings(config), str(out)
    else:
        config, expected, where = None, _settings(imported[0]) if imported else {}, f"the first run of {sources[0]}"
    for row in imported:
        found = _settings(row)
        if found != expected:
            name = next(n for n in SETTING_NAMES if found[n] != expected[n])
            raise SettingsMismatch(f"{row['method']} seed {row['seed']} ({row['dataset']}) was made with {name} = "
                                   f"{found[name]!r}, {where} with {expected[name]!r}; merge it into another --out")
    state = StateFile(state_path or default_state_path(out))
    seed_state_from_results(state, out)
    done = state.load()
    added = 0
    for row in imported:
        if _key(row) not in done:
            state.append(row)
            done[_key(row)] = row
            added += 1
    rows = list(done.values())
    if config is None:  # a new file: the settings the imported runs share
        config = PaperConfig(datasets=sorted({r["dataset"] for r in rows}), seeds=sorted({r["seed"] for r in rows}),
                             device=rows[0]["device"] if rows else "auto", **expected)
    # a new file: no environment of its own (this machine ran none of its runs); the note says where they ran
    document = paper_document(config, rows, previous.get("environment", {}), note or previous.get("note"))
    write_json(out, document)
    print(f"{added} runs added; {out} holds {len(document['runs'])} runs")
    return document


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("sources", type=Path, nargs="+", help="state files (JSON lines) of finished runs")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--state", type=Path, default=None, help="default: benchmarks/runs/<out name>.state.jsonl")
    parser.add_argument("--note", default=None, help="where the imported runs came from (shown with the table)")
    args = parser.parse_args(argv)
    missing = [str(p) for p in args.sources if not p.is_file()]
    if missing:
        print(f"error: no such file: {', '.join(missing)}", file=sys.stderr)
        return 2
    try:
        merge(args.out, args.sources, args.note, args.state)
    except SettingsMismatch as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
