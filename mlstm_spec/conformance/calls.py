"""Calling into an implementation so that nothing it does can end or stall the run.

Every call of an adapter's ``forward`` / ``gradients`` runs on a worker thread (one per adapter,
reused from call to call, so frameworks keep their per-thread caches). Whatever leaves the call is
turned into a :class:`CallResult`: a return value, any exception *including* ``SystemExit`` and
``KeyboardInterrupt`` raised by the adapter (a ``sys.exit(0)`` inside an adapter is a failure of
that adapter, not the end of the run), or a call still running after the time limit.

Python cannot stop a thread. A call that times out keeps running on its (daemon) thread until it
returns or the process exits; the caller is then *abandoned*: it makes no further calls, so the rest
of that adapter's checks are reported as not run, and other adapters go on. Two limits of doing this
in-process: a call that hangs while holding the GIL (a C extension spinning without releasing it)
stalls the whole process, and a call that ends the process itself (``os._exit``, a crash in native
code) ends the run; run ``mlstm-conformance`` under ``timeout`` from the shell if that can happen.
"""

from __future__ import annotations

import queue
import threading
from dataclasses import dataclass

import numpy as np

#: Seconds one call may take by default. Generous: the first call of a backend may compile (the
#: torch C++ loops build in about a minute on a busy 2-core machine; JIT backends compile per shape).
DEFAULT_TIMEOUT = 300.0


@dataclass
class CallResult:
    value: object = None
    exception: BaseException | None = None  # what the call raised (any BaseException)
    timed_out: bool = False

    @property
    def ok(self) -> bool:
        return self.exception is None and not self.timed_out


class _Job:
    def __init__(self, function, args, kwargs):
        self.function, self.args, self.kwargs = function, args, kwargs
        self.done = threading.Event()
        self.result = CallResult()


def materialise(tree):
    """NumPy arrays for every leaf of a nested result that NumPy can read (anything else is left as
    it is, for the comparison to report). Run on the worker thread: reading a lazily computed array
    (a JAX or TensorFlow result) may be where the implementation hangs."""
    if isinstance(tree, dict):
        return {k: materialise(v) for k, v in tree.items()}
    if isinstance(tree, (list, tuple)):
        return type(tree)(materialise(v) for v in tree)
    if tree is None or isinstance(tree, np.ndarray):
        return tree
    try:
        return np.asarray(tree)
    except Exception:  # noqa: BLE001 - the comparison reports it
        return tree


class Caller:
    """Calls into one adapter with a time limit (``timeout`` seconds; None or 0: no limit, and the
    call runs on the calling thread, where a KeyboardInterrupt cannot be told from the user's)."""

    def __init__(self, timeout: float | None = DEFAULT_TIMEOUT):
        self.timeout = timeout or None
        self.abandoned: str | None = None  # why no further calls are made
        self._jobs: queue.SimpleQueue | None = None

    def _worker(self, jobs: queue.SimpleQueue) -> None:
        while True:
            job = jobs.get()
            if job is None:
                return
            try:
                job.result.value = materialise(job.function(*job.args, **job.kwargs))
            except BaseException as exc:  # noqa: BLE001 - SystemExit and KeyboardInterrupt included
                job.result.exception = exc
            finally:
                job.done.set()

    def __call__(self, function, *args, **kwargs) -> CallResult:
        if self.abandoned:
            raise RuntimeError(f"no further calls: {self.abandoned}")
        if self.timeout is None:
            try:
                return CallResult(value=materialise(function(*args, **kwargs)))
            except (Exception, SystemExit) as exc:
                return CallResult(exception=exc)
        if self._jobs is None:
            self._jobs = queue.SimpleQueue()
            threading.Thread(target=self._worker, args=(self._jobs,), daemon=True,
                             name="mlstm-conformance-adapter").start()
        job = _Job(function, args, kwargs)
        self._jobs.put(job)
        if not job.done.wait(self.timeout):
            name = getattr(function, "__name__", "the call")
            self.abandoned = (f"{name}() did not return within {self.timeout:g} s; the adapter is not called "
                              "again (the call may still be running in the background)")
            self._jobs = None  # the stuck thread keeps its queue; nothing more is put on it
            return CallResult(timed_out=True)
        return job.result

    def close(self) -> None:
        """Let the worker thread end (it does once its current call, if any, returns)."""
        if self._jobs is not None:
            self._jobs.put(None)
            self._jobs = None
