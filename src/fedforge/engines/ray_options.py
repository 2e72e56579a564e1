"""The Ray engine's settings, checked without Ray or the engine (the run's settings check them as they load)."""

from __future__ import annotations

from ..errors import ConfigError
from . import IN_PROCESS_ENGINES


def check_options(workers: int, cpus_per_worker: float, gpus_per_worker: float, engine: str) -> None:
    """One-line ConfigErrors for settings of the Ray engine that cannot work."""
    if isinstance(workers, bool) or not isinstance(workers, int) or workers < 1:
        raise ConfigError(f"ray_workers must be an integer >= 1, got {workers!r}")
    if not cpus_per_worker > 0:
        raise ConfigError(f"ray_cpus_per_worker must be > 0, got {cpus_per_worker}")
    if not gpus_per_worker >= 0:
        raise ConfigError(f"ray_gpus_per_worker must be >= 0, got {gpus_per_worker}")
    if engine not in IN_PROCESS_ENGINES:
        raise ConfigError(
            f"ray_engine must be one of {', '.join(IN_PROCESS_ENGINES)} (the engine each Ray worker "
            f"trains with), got {engine!r}"
        )


__all__ = ["check_options"]
