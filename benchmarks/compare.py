"""Side-by-side timings that say no more than they measured: the median, best and spread of each
way's repeated times, and a winner only where the medians differ by more than either spread."""

from __future__ import annotations

import os
import statistics


def load_line() -> str:
    """The machine's 1/5/15-minute load averages, printed before timing: above the thread count, other
    processes share the cores and every figure is slower and noisier than on a quiet machine."""
    one, five, fifteen = os.getloadavg()
    return f"load average {one:.2f} {five:.2f} {fifteen:.2f} at start ({os.cpu_count()} cores)"


def summary(seconds: list[float]) -> dict:
    """best (min), median and spread (max - min) of one way's times, in seconds."""
    return {"best": min(seconds), "median": statistics.median(seconds), "spread": max(seconds) - min(seconds),
            "n": len(seconds)}


def verdict(name_a: str, a: dict, name_b: str, b: dict) -> str:
    """Which way is faster on the median (times: lower wins), or why no winner is named: the spread of
    either way's times exceeds the difference of the medians."""
    diff = abs(a["median"] - b["median"])
    spread = max(a["spread"], b["spread"])
    if spread >= diff:
        return (f"no winner between {name_a} and {name_b}: spread {spread * 1000:.0f} ms >= median "
                f"difference {diff * 1000:.0f} ms (rerun on a quiet machine, or with more repeats)")
    fast, slow = (name_a, name_b) if a["median"] < b["median"] else (name_b, name_a)
    ratio = max(a["median"], b["median"]) / min(a["median"], b["median"])
    return f"{fast} faster than {slow}: {ratio:.2f}x on the median (difference {diff * 1000:.0f} ms > spread " \
           f"{spread * 1000:.0f} ms)"
