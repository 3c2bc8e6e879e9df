"""`blitzdiff bench --interleave`: every system, built and warmed up by its sweep, timed again one call per round in
rotating order, and the speed-ups as per-round ratios (suite.Job.interleaved runs it). A drift of the machine slower
than a round moves both sides of a ratio alike; minutes apart, as the sweeps are, it does not."""

from __future__ import annotations

import statistics
from collections.abc import Callable, Sequence
from functools import partial
from typing import Any

import torch

from .measure import error_line, quartiles, timed_ms


def rotated(items: Sequence, r: int) -> list:
    """items in order from its r-th (mod its length): round r's order."""
    return [*items[r % len(items):], *items[:r % len(items)]] if items else []


def interleave(samples: dict[str, Callable[..., Any]], points: Sequence[tuple[int, int]],
               inputs: Callable[[int], dict[str, Any]], rounds: int, device: torch.device,
               log: Callable[[str], None]) -> dict[str, Any]:
    """Per (batch, steps) of `points`, `rounds` rounds of one timed call of every sample(batch, steps=steps,
    **inputs(batch)), the order rotated by one system per round: each system's times and median, and the per-round
    ratios (round_ratios). A system that fails is dropped from the rest, its error recorded."""
    names: list[str] = list(samples)
    errors: dict[str, str] = {}
    configurations = []
    for batch, steps in points:
        kwargs = inputs(batch)
        times: dict[str, list[float]] = {name: [] for name in names}
        for r in range(rounds):
            for name in rotated(names, r):
                try:
                    times[name].append(timed_ms(partial(samples[name], batch, steps=steps, **kwargs), device))
                except Exception as error:  # as bench's sweeps: recorded, the others go on
                    errors[name] = error_line(error)
            names = [name for name in names if name not in errors]
        measured = {name: times[name] for name in names}
        configurations.append({"batch": batch, "steps": steps, "times_ms": measured,
                               "median_ms": {name: statistics.median(t) for name, t in measured.items()},
                               "ratios": round_ratios(measured)})
        if configurations[-1]["ratios"]:
            log(f"[interleaved] {describe(configurations[-1])}")
    return {"rounds": rounds, "order": "rotated by one system per round", "configurations": configurations,
            "errors": errors}


def round_ratios(times: dict[str, list[float]]) -> list[dict[str, Any]]:
    """For each blitzdiff system against each baseline in `times` (ms per round, round by round; the baselines are
    the names without the "blitzdiff-" prefix): the median and quartiles of the per-round speed-ups, the baseline's
    time / the blitzdiff system's."""
    ours = [name for name in times if name.startswith("blitzdiff-")]
    ratios = []
    for system in ours:
        for baseline in (name for name in times if name not in ours):
            q25, median, q75 = quartiles([b / o for o, b in zip(times[system], times[baseline], strict=True)])
            ratios.append({"system": system, "baseline": baseline, "median": median, "q25": q25, "q75": q75})
    return ratios


def fastest_pair(configuration: dict[str, Any]) -> dict[str, Any] | None:
    """Of an interleaved configuration: the ratio of its fastest blitzdiff system against its fastest baseline (by
    their medians over the rounds), or None when a side has no system."""
    medians = configuration["median_ms"]
    pairs = configuration["ratios"]
    if not pairs:
        return None
    ours = min({r["system"] for r in pairs}, key=medians.__getitem__)
    theirs = min({r["baseline"] for r in pairs}, key=medians.__getitem__)
    return next(r for r in pairs if (r["system"], r["baseline"]) == (ours, theirs))


def describe(configuration: dict[str, Any]) -> str:
    best, medians = fastest_pair(configuration), configuration["median_ms"]
    return (f"batch {configuration['batch']} steps {configuration['steps']}: {len(medians)} systems alternated, "
            f"fastest {best['system']} {medians[best['system']]:.2f} ms against {best['baseline']} "
            f"{medians[best['baseline']]:.2f} ms: {best['median']:.2f}x [{best['q25']:.2f}-{best['q75']:.2f}]")
