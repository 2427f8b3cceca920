"""What the requests in an engine will hold in its KV cache, step by step until the last ends.

Each request holds its prompt and the tokens generated so far, grows by one token per engine
step and frees everything when it ends. Requests that started at different times do not peak
together: one near its end frees its blocks while a new one is still small. So the most the
cache will hold is not the sum of every request's final size, but the largest sum at any
future step of what the requests still running then hold. ``Projection`` computes that
profile once per engine step; ``room`` answers how many more jobs of an expected shape fit
under it at every step from now on, new jobs growing from their prompt to their end as well.

The profile can only peak just before a request ends (between two ends every live request
grows), so it is evaluated there: at most ``MAX_POINTS`` points, with requests' remaining
lifetimes rounded up to a coarser grid beyond that (a request assumed to live longer holds
more: the projection only errs on the safe side).
"""

from __future__ import annotations

import math
from typing import NamedTuple

import numpy as np

# Points of the profile evaluated at most (each costs one pass over the requests in flight).
MAX_POINTS = 32


class Shape(NamedTuple):
    """A request's tokens in the KV cache: held now (its prompt and what it generated) and
    expected when it ends."""

    held: float
    end: float


class Projection:
    """The KV tokens the requests in flight will hold (whole blocks), at the steps where that
    can peak: ``points`` of (steps from now, tokens held then)."""

    def __init__(self, held: np.ndarray, end: np.ndarray, block: int,
                 held_now: float = 0.0) -> None:
        """Requests as columns: the tokens each holds now (`held`) and is expected to hold
        when it ends (`end`). `held_now`: what the engine reports it holds now (it may hold
        more than the requests show, never less than it reports)."""
        self.block = max(1, block)
        # The points as columns: steps from now, and the tokens held then.
        self.steps, self.totals = np.zeros(1), np.array([float(held_now)])
        if len(held):
            # Steps each request still runs: it is in the cache at steps k < its lifetime.
            life = np.maximum(1, np.ceil(end - held - 1e-6))
            if len(np.unique(life)) > MAX_POINTS:
                grid = math.ceil(float(life.max()) / MAX_POINTS)
                life = np.ceil(life / grid) * grid
            steps = np.unique(np.concatenate(([1.0], life))) - 1  # just before each end
            alive = life[:, None] > steps[None, :]
            tokens = np.ceil((held[:, None] + steps[None, :]) / self.block - 1e-9) * self.block
            totals = (tokens * alive).sum(axis=0)
            totals[0] = max(totals[0], held_now)
            self.steps, self.totals = steps, totals
        # For ``room``: one more point, once every request ended (nothing held, for ever).
        self._steps_then = np.append(self.steps, np.inf)
        self._totals_then = np.append(self.totals, 0.0)

    @property
    def points(self) -> list[tuple[int, float]]:
        """(steps from now, tokens held then), at the steps where that can peak."""
        return [(int(k), float(t)) for k, t in zip(self.steps, self.totals, strict=True)]

    def room(self, job: Shape, pending: int, budget: float, requests: float = 1.0) -> int:
        """Jobs of `requests` requests of `job`'s shape each (a prompt held at once, then
        growing by a token per step up to its end) that can start now, beside `pending` such
        jobs that started and the requests in flight, without the cache ever holding more than
        `budget` tokens (one numpy pass over the points)."""
        tokens = np.minimum(job.end, job.held + self._steps_then)
        per_job = requests * np.maximum(1, np.ceil(tokens / self.block - 1e-9)) * self.block
        left = budget - self._totals_then
        if left.min() <= 0:
            return 0
        return max(0, int((left // per_job).min()) - pending)

    def peak(self) -> float:
        return float(self.totals.max())
