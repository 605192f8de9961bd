"""Capped exponential backoff with jitter, for API retries, watch restarts and apply retries."""

from __future__ import annotations

import random


class Backoff:
    """``initial * 2**n`` capped at ``cap``; each delay is drawn from [d/2, d] so that many agents
    restarted together (a whole fleet after an API server outage) do not come back in step."""

    def __init__(self, initial: float, cap: float, jitter: bool = True):
        self.initial = initial
        self.cap = cap
        self.jitter = jitter
        self.attempt = 0

    def peek(self) -> float:
        return min(self.cap, self.initial * (2 ** min(self.attempt, 32)))

    def next(self) -> float:
        delay = self.peek()
        self.attempt += 1
        return random.uniform(delay / 2, delay) if self.jitter else delay

    def reset(self) -> None:
        self.attempt = 0
