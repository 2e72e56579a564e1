"""The virtual clock: how long a client's task takes on its device, and when a synchronous round ends.

A task takes download + training + upload virtual seconds:

    bytes down / downlink + steps x step_seconds / speed + bytes up / uplink

with the client's profile (`devices.DeviceProfiles`) and `step_seconds`, the virtual cost of one
step on a device of speed 1. It depends on nothing but the profile and the task's size, so it is
known before the client trains (from its planned steps and the bytes it is sent; the round loop
counts an update's bytes as those of what it was sent, which an update mirrors) and is the same
on every engine and every machine. `Clock.task` is what an event-driven round loop asks for each
client it starts at a virtual time (when its update arrives); `synchronous_round` is the
synchronous loop's: who of a round's clients counts, given a deadline and over-selection.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field

from .devices import DeviceProfiles


@dataclass(frozen=True)
class TaskTime:
    """A client's task in virtual seconds: receiving the model, training, sending the update."""

    download: float
    train: float
    upload: float

    @property
    def total(self) -> float:
        return self.download + self.train + self.upload


@dataclass(frozen=True)
class Work:
    """A client's task as the clock sees it: its local steps and the bytes it receives and sends."""

    steps: int
    bytes_down: int
    bytes_up: int


@dataclass(frozen=True)
class Clock:
    """Durations of tasks on the clients' devices (`profiles`), a step costing `step_seconds` at speed 1."""

    profiles: DeviceProfiles
    step_seconds: float

    def task(self, client: int, work: Work) -> TaskTime:
        """How long client `client` takes for `work`."""
        p = self.profiles
        return TaskTime(
            download=work.bytes_down / float(p.down[client]),
            train=work.steps * self.step_seconds / float(p.speed[client]),
            upload=work.bytes_up / float(p.up[client]),
        )

    def steps_within(self, client: int, seconds: float, work: Work) -> int:
        """The most local steps client `client` can take and still have sent its update within
        `seconds` of receiving the task (0 when not even one fits)."""
        time = self.task(client, Work(0, work.bytes_down, work.bytes_up))
        left = seconds - time.total
        if left < 0:
            return 0
        # A hair of slack so that a step that ends exactly at the deadline counts.
        return min(work.steps, max(0, math.floor(left * float(self.profiles.speed[client]) / self.step_seconds + 1e-9)))


@dataclass(frozen=True)
class RoundTiming:
    """A synchronous round on the clock: the clients that count, those that did not (late, lost to
    over-selection, or gone offline before they finished), the steps each client that sends part
    of its work finished by the deadline, when each that counts finished, and when the round ends
    (virtual seconds since the run's start)."""

    kept: tuple[int, ...]
    late: tuple[int, ...]
    partial: Mapping[int, int] = field(default_factory=dict)
    finish: Mapping[int, float] = field(default_factory=dict)
    end: float = 0.0


def synchronous_round(
    clock: Clock,
    start: float,
    work: Mapping[int, Work],
    *,
    keep: int | None = None,
    deadline: float | None = None,
    partial: bool = False,
    missing: bool = False,
) -> RoundTiming:
    """Round that starts at virtual time `start` with the clients of `work` (those that will report:
    `missing` says whether some selected clients never will).

    A client counts when it finishes by `start + deadline` (with `partial`, one that would not
    sends the steps it finished by then, if any) and before its availability window closes; of
    those, the first `keep` to finish (ties: the lower id), when `keep` is given (over-selection).
    The round ends when its last counted client finishes, or at the deadline when fewer count than
    the round waits for (all its clients, or `keep`): the server waits for them until then. Without
    a deadline it waits for a client that goes offline mid-round until it leaves.
    """
    finish: dict[int, float] = {}
    budget: dict[int, int] = {}
    late: list[int] = []
    gone: list[float] = []  # when the clients that went offline before sending left
    for client, task in work.items():
        ends = start + clock.task(client, task).total
        leaves = clock.profiles.online_until(client, start)
        if deadline is not None and ends > start + deadline:
            steps = clock.steps_within(client, deadline, task) if partial else 0
            if steps == 0:
                late.append(client)
                continue
            budget[client] = steps
            ends = start + clock.task(client, Work(steps, task.bytes_down, task.bytes_up)).total
        if leaves is None or ends > leaves:  # offline at the start, or gone before it sent its update
            late.append(client)
            budget.pop(client, None)
            if leaves is not None:
                gone.append(leaves)
            continue
        finish[client] = ends
    order = sorted(finish, key=lambda c: (finish[c], c))
    if keep is not None and len(order) > keep:
        late += order[keep:]
        order = order[:keep]
    kept = sorted(order)
    short = len(kept) < keep if keep is not None else missing or len(kept) < len(work)
    waited = deadline is not None and short
    waited_for = [*(finish[c] for c in kept), *(gone if short else ())]
    end = start + deadline if waited and deadline is not None else max(waited_for, default=start)
    return RoundTiming(
        kept=tuple(kept),
        late=tuple(sorted(late)),
        partial={c: budget[c] for c in kept if c in budget},
        finish={c: finish[c] for c in kept},
        end=end,
    )


__all__ = ["Clock", "RoundTiming", "TaskTime", "Work", "synchronous_round"]
