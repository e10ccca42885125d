"""Shared by every script in experiments/: record the machine's load while a benchmark ran, and flag
(visibly, in the results file) runs whose numbers the load makes untrustworthy.

    load = benchlib.LoadMonitor()          # records os.getloadavg() and the core count now
    ... the run ...
    text += load.markdown()                 # load before/after; a "WARNING" line when it exceeded the cores
    text += benchlib.peer_warning(times)    # a peer's repetition times: flags a median far below its best

A run is flagged when the 1-minute load average before or after it exceeded the core count (other
jobs competed for the CPU), or when a peer's median repetition ran at less than half the speed of its
own fastest repetition in the same run (its idle speed, as near as the script measured it).
"""
from __future__ import annotations

import os
import statistics
import subprocess
import time

PEER_SLOW_FACTOR = 0.5  # median speed below this fraction of the best repetition's speed: flagged


def git_commit() -> str:
    try:
        root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=root, capture_output=True, text=True,
                              check=True).stdout.strip()
    except Exception:  # noqa: BLE001 - not a git checkout
        return "unknown"


class LoadMonitor:
    """Load average (1, 5, 15 min) when created and when `finish` (or any report) is called."""

    def __init__(self):
        self.cores = os.cpu_count() or 1
        self.before = os.getloadavg()
        self.after = None
        self.t0 = time.time()

    def finish(self):
        if self.after is None:
            self.after = os.getloadavg()
        return self

    @property
    def overloaded(self) -> bool:
        self.finish()
        return max(self.before[0], self.after[0]) > self.cores

    def record(self) -> dict:
        """For JSON results."""
        self.finish()
        return {"loadavg_before": [round(x, 2) for x in self.before], "loadavg_after": [round(x, 2) for x in self.after],
                "cores": self.cores, "overloaded": self.overloaded, "seconds": round(time.time() - self.t0, 1)}

    def summary_line(self) -> str:
        self.finish()
        s = (f"load average (1/5/15 min) before {'/'.join(f'{x:.2f}' for x in self.before)}, after "
             f"{'/'.join(f'{x:.2f}' for x in self.after)} on {self.cores} cores")
        if self.overloaded:
            s = (f"WARNING: LOADED MACHINE: the 1-min load average ({max(self.before[0], self.after[0]):.2f}) exceeded "
                 f"the {self.cores} cores; timings of this run are not trustworthy. " + s)
        return s

    def markdown(self) -> str:
        line = self.summary_line()
        return f"\n**{line}**\n" if self.overloaded else f"\n{line}\n"

    @classmethod
    def markdown_of(cls, record) -> str:
        """`markdown` of a stored `record()` (a results JSON written before this helper existed: a note)."""
        if not record:
            return "\n(load average not recorded by this run)\n"
        m = cls.__new__(cls)
        m.cores, m.before, m.after, m.t0 = record["cores"], record["loadavg_before"], record["loadavg_after"], 0.0
        return m.markdown()


def peer_warning(seconds, label: str = "peer") -> str:
    """Markdown warning when a peer's median repetition was far slower than its best one, else ''."""
    ts = [float(t) for t in seconds if t and t > 0]
    if len(ts) < 2:
        return ""
    best, med = min(ts), statistics.median(ts)
    if best / med < PEER_SLOW_FACTOR:
        return (f"\n**WARNING: {label} ran far below its own idle speed in this run: median {med:.3f} s vs best "
                f"{best:.3f} s per repetition ({best / med:.2f}x); its numbers (and ratios to it) are suspect.**\n")
    return ""
