"""Running a conformance run's checks in more than one process (``mlstm-conformance --jobs N``).

The units of a run, one per (implementation, device, dtype), are split by dtype into lanes: the first
lane runs in the runner's own process, each other one in a child process (``python -m
mlstm_spec.conformance`` on the same targets, restricted to the lane's dtypes with ``--dtypes``).
Split by dtype, because the JAX-based adapters (jax, flax, flax_nnx) share their compilations within a
process and compile once per case and dtype: the implementations of one dtype stay together. Measured
on a 2-core Intel Xeon (the default run, every backend): 175-184 s in one process, 115-134 s in two.

A child reports each finished unit as one JSON line on its standard output (the parent's progress
display shows it as it comes) and, at its end, every unit's results in a pickle file that the parent
reads back. A child that ends without results turns each of its units into a failure that says so:
a check that did not run is never a pass.
"""

from __future__ import annotations

import json
import os
import pickle
import subprocess
import sys
import tempfile
import threading
from collections import deque

from .tolerances import DTYPES


def default_jobs() -> int:
    """Two processes where the machine has two or more CPU cores, else one."""
    return 2 if (os.cpu_count() or 1) >= 2 else 1


def split(units: list, jobs: int) -> list:
    """``units`` ((target, dtype) pairs) as lanes: lists of units, one per process, at most ``jobs``,
    each dtype in one lane (dtypes dealt out in turn, in the order of DTYPES). One lane when there
    is one dtype or ``jobs`` is 1."""
    dtypes = sorted({dtype for _, dtype in units}, key=lambda d: DTYPES.index(d) if d in DTYPES else len(DTYPES))
    count = max(1, min(jobs, len(dtypes)))
    lane_of = {dtype: i % count for i, dtype in enumerate(dtypes)}
    lanes = [[] for _ in range(count)]
    for unit in units:
        lanes[lane_of[unit[1]]].append(unit)
    return lanes


def unit_key(target, dtype) -> tuple:
    return target.label, target.device, dtype


def child_argv(args, profile: str, seed, dtypes: list, results_path: str) -> list:
    """The command-line arguments of a child that runs this run's targets in ``dtypes`` only."""
    argv = ["--dtypes", ",".join(dtypes), "--profile", profile, "--tiers", ",".join(args.tiers),
            "--jobs", "1", "--no-diagnosis", "--lane-results", results_path]
    for option, value in (("--backends", args.backends), ("--devices", args.devices)):
        if value is not None:
            argv += [option, ",".join(value)]
    for spec in args.impl:
        argv += ["--impl", spec]
    for option, value in (("--max-examples", args.max_examples), ("--seed", seed), ("--timeout", args.timeout)):
        if value is not None:
            argv += [option, str(value)]
    return argv


class Child:
    """One lane in a child process: started at once, its progress relayed by a thread."""

    def __init__(self, args, profile: str, seed, lane: list, progress):
        self.lane = lane
        self.directory = tempfile.mkdtemp(prefix="mlstm-conformance-lane-")
        self.results_path = os.path.join(self.directory, "results.pickle")
        self.stderr_path = os.path.join(self.directory, "stderr.txt")
        dtypes = list(dict.fromkeys(dtype for _, dtype in lane))
        command = [sys.executable, "-m", "mlstm_spec.conformance",
                   *child_argv(args, profile, seed, dtypes, self.results_path)]
        self.stderr = open(self.stderr_path, "w+", encoding="utf-8")
        self.process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=self.stderr, text=True,
                                        encoding="utf-8", errors="replace")
        self.relay = threading.Thread(target=self._relay, args=(progress,), daemon=True)
        self.relay.start()

    def _relay(self, progress) -> None:
        for line in self.process.stdout:
            try:
                event = json.loads(line)
            except ValueError:
                continue  # not a progress line (a framework printing on stdout)
            if isinstance(event, dict) and event.get("event") == "finished":
                progress.finished_elsewhere(event["label"], event["verdict"], event["examples"], event["seconds"])

    def stop(self) -> None:
        """Ends the child if it is still running (an interrupted run)."""
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait()

    def collect(self) -> list:
        """Waits for the child; its units' results as ``[(target, dtype, results)]``, in the lane's
        order. A unit the child did not report is one failure row that says why."""
        status = self.process.wait()
        self.relay.join()
        found = {}
        try:
            with open(self.results_path, "rb") as stored:
                found = pickle.load(stored)  # written by our own child process, in a directory of ours
        except (OSError, EOFError, pickle.UnpicklingError):
            pass
        self.stderr.seek(0)
        tail = " | ".join(deque((line.strip() for line in self.stderr if line.strip()), maxlen=3))
        self.stderr.close()
        for name in (self.results_path, self.stderr_path):
            try:
                os.remove(name)
            except OSError:
                pass
        os.rmdir(self.directory)
        out = []
        for target, dtype in self.lane:
            results = found.get(unit_key(target, dtype))
            if results is None:
                results = [_not_reported(target, dtype, status, tail)]
            out.append((target, dtype, results))
        return out


def _not_reported(target, dtype, status: int, tail: str):
    from .suite import CheckResult

    why = f"the child process that ran the {dtype} checks ended (exit status {status}) without their results"
    return CheckResult(target.adapter.name, target.device, dtype, "suite", None, status="fail",
                       message=why + (f"; it printed: {tail}" if tail else ""))


def write_results(path: str, units: list) -> None:
    """In a child: every unit's results, for the parent (see :meth:`Child.collect`)."""
    with open(path, "wb") as out:
        pickle.dump({unit_key(target, dtype): results for target, dtype, results in units}, out)


def progress_line(label: str, verdict: str, examples: int, seconds: float) -> str:
    """A child's report of one finished unit, as :meth:`Child._relay` reads it."""
    return json.dumps({"event": "finished", "label": label, "verdict": verdict, "examples": examples,
                       "seconds": round(seconds, 3)})
