"""The package's public surface is `fedforge.__all__`, no more and no less (after httpx's
tests/test_exported_members.py); the version is written once."""

import re
import subprocess
import sys
import types
from pathlib import Path

from helpers import PROCESS_S, bound

import fedforge

ROOT = Path(__file__).resolve().parents[1]


def test_every_exported_name_exists():
    missing = [name for name in fedforge.__all__ if not hasattr(fedforge, name)]
    assert missing == []
    assert len(set(fedforge.__all__)) == len(fedforge.__all__)


def test_every_public_name_is_exported():
    """Modules are reached as fedforge.<module>; every other public name of the package is in __all__."""
    public = {
        name
        for name, value in vars(fedforge).items()
        if not name.startswith("_") and not isinstance(value, types.ModuleType)
    }
    assert sorted(public - set(fedforge.__all__)) == []


def test_exported_subpackages_name_only_what_they_have():
    for name in ("data", "engines", "models", "strategies"):
        module = getattr(fedforge, name)
        assert isinstance(module, types.ModuleType)
        assert [n for n in getattr(module, "__all__", ()) if not hasattr(module, n)] == [], name


def test_the_version_is_written_once():
    assert re.fullmatch(r"\d+\.\d+\.\d+", fedforge.__version__)
    pyproject = (ROOT / "pyproject.toml").read_text()
    assert 'dynamic = ["version"]' in pyproject and 'version = { attr = "fedforge.__version__" }' in pyproject
    assert not re.search(r'^version\s*=\s*"', pyproject, re.MULTILINE)  # no second copy
    proc = subprocess.run(
        [sys.executable, "-m", "fedforge", "--version"], capture_output=True, text=True, timeout=bound(PROCESS_S)
    )
    assert proc.returncode == 0 and proc.stdout == f"fedforge {fedforge.__version__}\n"


def test_the_package_says_it_is_typed():
    assert (Path(fedforge.__file__).parent / "py.typed").exists()
    assert 'fedforge = ["py.typed"' in (ROOT / "pyproject.toml").read_text()
