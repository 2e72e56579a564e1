"""Every script in examples/ runs as a user would run it, and learns."""

import re
import subprocess
import sys
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).parent.parent / "examples"


def test_tabular_regression_with_adam():
    pytest.importorskip("sklearn")
    out = subprocess.run([sys.executable, str(EXAMPLES / "tabular_regression.py"), "--rounds", "6"],
                         capture_output=True, text=True, timeout=120, check=True).stdout
    r2 = [float(x) for x in re.findall(r"r2\s+(-?[\d.]+)", out)]
    assert len(r2) == 7 and r2[0] < 0 < 0.3 < r2[-1]  # the initial model predicts about 0: R^2 far below zero


def test_own_training_loop():
    pytest.importorskip("sklearn")
    out = subprocess.run([sys.executable, str(EXAMPLES / "own_training_loop.py"), "--rounds", "4"],
                         capture_output=True, text=True, timeout=120, check=True).stdout
    accuracy = [float(x) for x in re.findall(r"test accuracy ([\d.]+)", out)]
    assert len(accuracy) == 5 and accuracy[0] < 0.2 and accuracy[-1] > 0.85
