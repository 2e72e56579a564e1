"""The README's code runs as printed."""

import re
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import bound

README = (Path(__file__).parent.parent / "README.md").read_text()


def test_the_own_task_example_runs(tmp_path):
    pytest.importorskip("sklearn")
    code = README.split("### Your own task")[1].split("```python")[1].split("```")[0]
    (tmp_path / "example.py").write_text(code)
    out = subprocess.run(
        [sys.executable, "example.py"], cwd=tmp_path, capture_output=True, text=True, timeout=bound(600), check=True
    ).stdout
    within, loss = (eval(line) for line in out.strip().splitlines()[-2:])
    assert len(within) == len(loss) == 11
    assert within[-1] > within[0] and loss[-1] < loss[0] / 2
    assert re.search(r"within_25", code)
