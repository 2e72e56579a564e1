"""The README's code runs as printed, and its links lead somewhere."""

import re
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import bound

ROOT = Path(__file__).parent.parent
README = (ROOT / "README.md").read_text()


def _run(code: str, cwd: Path) -> str:
    (cwd / "example.py").write_text(code)
    return subprocess.run(
        [sys.executable, "example.py"], cwd=cwd, capture_output=True, text=True, timeout=bound(600), check=True
    ).stdout


def test_the_python_quickstart_runs_and_learns(tmp_path, fashion):
    code = README.split("## Quickstart in Python")[1].split("```python")[1].split("```")[0]
    assert len(code.strip().splitlines()) <= 20
    accuracy = float(_run(code, tmp_path).strip().splitlines()[-1])
    assert 0.6 < accuracy < 1  # ten rounds of the tutorial's MLP on Fashion-MNIST: well above chance (0.1)


def test_the_own_task_example_runs():
    pytest.importorskip("sklearn")
    out = subprocess.run(
        [sys.executable, str(ROOT / "examples" / "own_task.py")],
        capture_output=True,
        text=True,
        timeout=bound(600),
        check=True,
    ).stdout
    within, loss = (eval(line) for line in out.strip().splitlines()[-2:])
    assert len(within) == len(loss) == 11
    assert within[-1] > within[0] and loss[-1] < loss[0] / 2
    assert "examples/own_task.py" in README


def test_the_readme_is_short_and_its_links_lead_to_files():
    assert len(README.splitlines()) <= 150
    links = re.findall(r"\]\(((?:docs|examples)/[^)#]+)", README)
    assert links and all((ROOT / link).is_file() for link in links), links
