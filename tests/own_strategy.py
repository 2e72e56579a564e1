"""A strategy of one's own, written as a module into a test's folder and named on the command line."""

import sys
from pathlib import Path

SOURCE = '''
"""FedAvg that notes its server_lr each round it steps (the test reads noted.txt)."""

from dataclasses import dataclass

from fedforge.strategies import FedAvg


@dataclass(frozen=True)
class Noted(FedAvg):
    name = "noted"

    def _note(self):
        with open("noted.txt", "a") as f:
            f.write(f"{self.server_lr}\\n")

    def aggregate(self, state, updates):
        self._note()
        return super().aggregate(state, updates)

    def apply_mean(self, state, mean):
        self._note()
        return super().apply_mean(state, mean)
'''


def write_strategy(folder: Path, module: str) -> str:
    """Write the module `module` (a fresh name per test: imported modules stay in sys.modules)
    into `folder`; its `package.module:object` name."""
    (folder / f"{module}.py").write_text(SOURCE)
    sys.modules.pop(module, None)
    return f"{module}:Noted"


def notes(folder: Path) -> list[str]:
    path = folder / "noted.txt"
    return path.read_text().split() if path.exists() else []
