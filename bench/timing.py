"""The one timing loop of the suite: contenders interleaved round-robin.

Every repeat runs every contender once, starting from a different one each
repeat, so that machine noise (this machine is shared) and cache state after
the previous contender fall on all of them alike. A sample is the mean time of
``inner`` consecutive calls, each timed on its own with ``time.perf_counter``;
the first call of each contender sets ``inner``: 1 for anything slower than
``SAMPLE_TARGET_S``, more for tiny calls so that a sample is not timer noise.
Set-up and clean-up around each call (handing out fresh arrays, restoring
clipped data) are never timed. The cyclic garbage collector is off while timing.
"""

import gc
import math
import statistics
import time
from dataclasses import dataclass, field
from typing import Any, Callable

SAMPLE_TARGET_S = 0.005
MAX_INNER = 200


def _no_setup():
    return None


def _no_cleanup(_):
    return None


@dataclass(frozen=True)
class Timed:
    """One contender of an interleaved measurement.

    ``call(arg)`` is timed; ``prepare()`` makes its argument and ``finish(arg)``
    runs after it, both untimed.
    """

    key: Any
    call: Callable[[Any], Any]
    prepare: Callable[[], Any] = _no_setup
    finish: Callable[[Any], None] = _no_cleanup

    def seconds_per_call(self, inner):
        total = 0.0
        for _ in range(inner):
            arg = self.prepare()
            start = time.perf_counter()
            self.call(arg)
            total += time.perf_counter() - start
            self.finish(arg)
        return total / inner


@dataclass
class Samples:
    """Per-call seconds, one figure per repeat, each the mean of ``inner`` calls."""

    inner: int = 0  # 0 until the first call sets it
    seconds: list = field(default_factory=list)

    @property
    def median(self):
        return statistics.median(self.seconds)

    @property
    def min(self):
        return min(self.seconds)


def measure_interleaved(items, repeats, budget_s=math.inf, min_repeats=3):
    """``{item.key: Samples}`` for every item, timed round-robin over ``repeats`` repeats.

    Repeating stops early once ``budget_s`` seconds have passed and at least
    ``min_repeats`` rounds are done. The first call of an item sets its
    ``inner``; it is kept as the first sample when ``inner`` is 1 and discarded
    otherwise. Warm up (compile) and check the items before calling this.
    """
    was_enabled = gc.isenabled()
    gc.collect()
    gc.disable()
    started = time.perf_counter()
    try:
        samples = {item.key: Samples() for item in items}
        for repeat in range(repeats):
            if repeat >= min_repeats and time.perf_counter() - started > budget_s:
                break
            shift = repeat % len(items)
            for item in items[shift:] + items[:shift]:
                of_item = samples[item.key]
                if not of_item.inner:  # first call: calibrate
                    first = item.seconds_per_call(1)
                    of_item.inner = max(1, min(MAX_INNER, math.ceil(SAMPLE_TARGET_S / max(first, 1e-9))))
                    if of_item.inner == 1:
                        of_item.seconds.append(first)
                        continue
                of_item.seconds.append(item.seconds_per_call(of_item.inner))
        return samples
    finally:
        if was_enabled:
            gc.enable()
