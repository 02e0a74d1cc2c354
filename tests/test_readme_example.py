"""README's Python section runs as written, and what it prints is true."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"


def _python_section_script() -> str:
    found = re.search(r"^## Python\n.*?^```python\n(.*?)^```", README.read_text(), re.S | re.M)
    assert found, "README.md has no ## Python section with a python block"
    return found.group(1)


def test_the_readme_python_script_trains_saves_loads_and_segments(tmp_path):
    from napari_selfreg.core.checkpoint import read_model_info

    script = tmp_path / "example.py"
    script.write_text(_python_section_script())
    done = subprocess.run([sys.executable, str(script)], cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    lines = done.stdout.strip().splitlines()
    assert [line.split(":")[0] for line in lines[:-1]] == [f"step {n}" for n in range(1, 61)]
    counted = re.fullmatch(r"(\d+) nuclei, Dice (0\.\d\d|1\.00)", lines[-1])
    assert counted, lines[-1]
    # the sample holds 55 nuclei; 60 steps on its strokes find them roughly
    assert 25 <= int(counted.group(1)) <= 110 and float(counted.group(2)) >= 0.5
    info = read_model_info(tmp_path / "nuclei.safetensors")
    assert info.class_names == ["background", "nucleus"] and info.training["steps"] == 60
