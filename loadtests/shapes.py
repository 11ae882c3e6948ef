"""Load profiles as locust LoadTestShapes: steady, step, spike and soak. Each is a
list of stages over a bounded duration; `tick()` returns None after the last one,
so a headless run stops by itself.

The locustfile runs one of them by name (PROFILES, `--imagegen-profile`), sized by
`--imagegen-users` and `--imagegen-duration`. It imports this module, never the
classes themselves: locust runs the first shape it finds in a locustfile's namespace.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from locust import LoadTestShape


@dataclass(frozen=True)
class Stage:
    until_s: float  # from the start of the run
    users: int
    spawn_rate: float  # users started or stopped per second on entering the stage


class StagedShape(LoadTestShape):
    """A shape given as stages; None (stop) after the last."""

    abstract = True
    default_users = 4
    default_duration_s = 60.0

    def __init__(self, users: int | None = None, duration_s: float | None = None) -> None:
        super().__init__()
        self.users = max(1, int(users or self.default_users))
        self.duration_s = float(duration_s or self.default_duration_s)
        if not 0 < self.duration_s < math.inf:
            raise ValueError(f"duration {self.duration_s!r} s: must be positive and finite")

    def stages(self) -> list[Stage]:
        raise NotImplementedError

    def tick(self) -> tuple[int, float] | None:
        t = self.get_run_time()
        for s in self.stages():
            if t < s.until_s:
                return s.users, s.spawn_rate
        return None


class SteadyShape(StagedShape):
    """`users` from the first second, for the whole duration."""

    def stages(self) -> list[Stage]:
        return [Stage(self.duration_s, self.users, self.users)]


class StepShape(StagedShape):
    """`steps` equal steps up to `users`: users/steps more each duration/steps."""

    steps = 4
    default_users = 8
    default_duration_s = 100.0

    def stages(self) -> list[Stage]:
        step = self.duration_s / self.steps
        return [Stage(step * (k + 1), max(1, round(self.users * (k + 1) / self.steps)),
                      self.users) for k in range(self.steps)]


class SpikeShape(StagedShape):
    """A base of `users`, then `factor` times as many at once for the middle fifth,
    then the base again (does the stack recover?)."""

    factor = 4
    default_users = 2
    default_duration_s = 60.0

    def stages(self) -> list[Stage]:
        d, peak = self.duration_s, self.users * self.factor
        return [Stage(0.4 * d, self.users, self.users), Stage(0.6 * d, peak, peak),
                Stage(d, self.users, peak)]


class SoakShape(StagedShape):
    """A ramp to `users` over a tenth of the duration (at most 30 s), then held: long
    enough to see memory and file handles settle."""

    default_users = 8
    default_duration_s = 240.0

    def stages(self) -> list[Stage]:
        ramp = min(30.0, self.duration_s / 10)
        return [Stage(self.duration_s, self.users, self.users / max(ramp, 1.0))]


# profile -> (shape, default users, default duration s); `smoke` is a short steady run.
PROFILES: dict[str, tuple[type[StagedShape], int, float]] = {
    "smoke": (SteadyShape, 2, 10.0),
    "steady": (SteadyShape, 4, 60.0),
    "step": (StepShape, 8, 100.0),
    "spike": (SpikeShape, 2, 60.0),
    "soak": (SoakShape, 8, 240.0),
}


def for_profile(name: str, users: int | None = None,
                duration_s: float | None = None) -> StagedShape:
    """The profile's shape, its defaults overridden by users / duration_s."""
    try:
        cls, default_users, default_duration = PROFILES[name]
    except KeyError:
        raise ValueError(f"unknown profile {name!r}: one of {', '.join(PROFILES)}") from None
    return cls(users or default_users, duration_s or default_duration)
