"""The property-based conformance suite: any implementation, through an adapter, against the spec.

An *adapter* wraps one implementation on one device (NumPy in, NumPy out)::

    class Adapter:
        name: str                      # e.g. "torch"
        device: str = "cpu"            # optional; "cuda:0", "gpu", ...
        dtypes: tuple = ("float64", "float32")   # optional; which dtypes to check
        def forward(self, params, xs, state, *, integration_mode): ...   # -> hs, (h_T, c_T)
        def gradients(self, params, xs, state, d_hs, d_state, *, integration_mode): ...  # optional
        def supports(self, options) -> bool: ...                        # optional

``params`` is one canonical mapping, or a list of them when ``options["num_layers"] > 1`` (only drawn
when ``supports`` accepts it); then ``state``/``d_state`` and the returned final state are lists of
``(h, c)`` pairs, one per layer, and ``gradients`` returns a list of per-layer mappings with ``"x"`` in
the first. :func:`check` runs the property "for every drawn case, the adapter equals the spec within
the tolerance of its dtype and device" and returns one :class:`CheckResult` per check.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

import numpy as np
from hypothesis import given, reject, seed as hypothesis_seed, settings as hypothesis_settings, strategies as st

from ..equations import INTEGRATION_MODES
from .cases import Case, reference_forward, reference_gradients
from .tolerances import relative_error, tolerance

CHECKS = ("outputs", "final_state", "gradients")
DEFAULT_DTYPES = ("float64", "float32")


class ConformanceError(AssertionError):
    """An implementation disagreed with the spec (or crashed); the message says where, by how much,
    and how to reproduce it. ``check`` names the check in :data:`CHECKS` that failed."""

    def __init__(self, message: str, check: str = "outputs"):
        super().__init__(message)
        self.check = check


@dataclass
class CheckResult:
    implementation: str
    device: str
    dtype: str
    check: str
    tolerance: float
    status: str = "pass"  # "pass", "fail" or "skip"
    worst_error: float = 0.0
    worst_at: str = ""  # e.g. "hs[0, 3, 1] (case #7)"
    examples: int = 0
    message: str = ""  # the failure, or why it was skipped
    reproducer: str = ""  # Python that reproduces the smallest failing example

    def as_dict(self) -> dict:
        return dataclasses.asdict(self)


# ---- adapter introspection ----

def adapter_device(adapter) -> str:
    return str(getattr(adapter, "device", "cpu"))


def adapter_dtypes(adapter) -> tuple:
    return tuple(getattr(adapter, "dtypes", DEFAULT_DTYPES))


def supports(adapter, options: dict) -> bool:
    ask = getattr(adapter, "supports", None)
    if ask is None:
        return options["num_layers"] == 1
    return bool(ask(options))


def has_gradients(adapter) -> bool:
    return callable(getattr(adapter, "gradients", None))


# ---- what is drawn ----

def cases(dtype: str, adapter=None, *, max_batch=3, max_steps=6, max_size=5, max_layers=2):
    """Hypothesis strategy of :class:`Case` for one dtype, narrowed by the adapter's ``supports``."""
    stacks = adapter is None or supports(adapter, Case(1, 1, 1, 1, dtype=dtype, num_layers=2).options)
    strategy = st.builds(
        Case,
        batch=st.one_of(st.integers(1, max_batch), st.none()),
        steps=st.integers(1, max_steps),
        input_size=st.integers(1, max_size),
        hidden_size=st.integers(1, max_size),
        dtype=st.just(dtype),
        integration_mode=st.sampled_from(INTEGRATION_MODES),
        bias=st.booleans(),
        recurrent_bias=st.booleans(),
        multiplicative_bias=st.booleans(),
        independent_recurrence=st.booleans(),
        num_layers=st.integers(1, max_layers if stacks else 1),
        with_state=st.booleans(),
        with_d_state=st.booleans(),
        weight_scale=st.sampled_from([1.0, 0.5, 2.0]),
        seed=st.integers(0, 2**31 - 1),
    )
    if adapter is not None:
        strategy = strategy.filter(lambda case: supports(adapter, case.options))
    return strategy


# ---- comparing one case ----

@dataclass
class _Tracker:
    """Worst error per check over the examples run so far, and the last failure."""

    results: dict
    dtype: str
    examples: int = 0
    failure: tuple | None = None  # (check, message, case)

    def record(self, check, error, where):
        result = self.results[check]
        if error > result.worst_error or not result.worst_at:
            result.worst_error, result.worst_at = error, f"{where} (example {self.examples})"


def _fmt_index(name, index):
    return f"{name}[{', '.join(map(str, index))}]" if index else name


def _compare(tracker, check, name, actual, expected, tol, context):
    __tracebackhide__ = True
    expected = np.asarray(expected)
    try:
        actual_arr = np.asarray(actual)
    except Exception as exc:  # e.g. a framework tensor that NumPy cannot read
        raise ConformanceError(f"{name} could not be read as an array ({exc}) [{context}]", check) from None
    if actual_arr.shape != expected.shape:
        raise ConformanceError(
            f"{name} has shape {actual_arr.shape}, but should have {expected.shape} [{context}]", check
        )
    want_dtype = tracker.dtype
    # bfloat16 arrives as ml_dtypes.bfloat16 (kind "V"), or as float32 when ml_dtypes is missing
    exempt = want_dtype == "bfloat16" and actual_arr.dtype.kind != "V"
    if actual_arr.dtype.name != want_dtype and not exempt:
        raise ConformanceError(
            f"{name} has dtype {actual_arr.dtype.name}, but should keep the input dtype {want_dtype} [{context}]",
            check,
        )
    error, index = relative_error(actual_arr, expected)
    where = _fmt_index(name, index)
    tracker.record(check, error, where)
    if not error <= tol:
        got = float(np.asarray(actual_arr[index] if index else actual_arr, dtype=np.float64))
        want = float(expected[index] if index else expected)
        raise ConformanceError(
            f"{where}={got:.6g}, but should be {want:.6g} (relative error {error:.2e} > "
            f"tolerance {tol:.0e}) [{context}]", check
        )


def _pairs(final, layers):
    """Final state as a list of (h, c), one per layer, whatever the adapter returned."""
    if layers == 1:
        final = [final]
    if not isinstance(final, (list, tuple)) or len(final) != layers:
        raise ConformanceError(f"final state should be {layers} (h, c) pair(s), got {type(final).__name__}", "final_state")
    for pair in final:
        if not isinstance(pair, (list, tuple)) or len(pair) != 2:
            raise ConformanceError(f"final state should be a pair (h, c), got {type(pair).__name__}", "final_state")
    return final


def _call(check, context, function, *args, **kwargs):
    """Call into the implementation; a crash is a failure of the check it happened in."""
    __tracebackhide__ = True
    try:
        return function(*args, **kwargs)
    except Exception as exc:
        raise ConformanceError(
            f"{function.__name__}() raised {type(exc).__name__}: {exc} [{context}]", check
        ) from exc


def representable(tree, dtype: str) -> bool:
    """Whether every value in a nested structure of float64 arrays fits the finite range of ``dtype``."""
    if dtype == "bfloat16":
        return True  # float32's exponent range: nothing the suite draws comes near it
    largest = float(np.finfo(dtype).max)
    if isinstance(tree, dict):
        return all(representable(v, dtype) for v in tree.values())
    if isinstance(tree, (list, tuple)):
        return all(representable(v, dtype) for v in tree)
    return tree is None or bool(np.all(np.abs(tree) <= largest))


def check_case(adapter, case: Case, tracker: _Tracker, tol: float, gradients: bool,
               inside_property: bool = True) -> None:
    """Compare the adapter with the spec on one case; raises :class:`ConformanceError`.

    A case whose exact results the dtype cannot represent is rejected (Hypothesis draws another), or
    raises ValueError when run outside a property (``inside_property=False``).
    """
    __tracebackhide__ = True
    arrays = case.arrays()
    context = (
        f"impl={adapter.name}, device={adapter_device(adapter)}, dtype={case.dtype}, "
        f"B={case.batch}, T={case.steps}, I={case.input_size}, H={case.hidden_size}"
    )
    mode = case.integration_mode
    want_hs, want_final = reference_forward(arrays, mode)
    want_grads = reference_gradients(arrays, mode) if gradients else None
    # A case whose exact answer is not representable in the dtype (a float16 gradient above 65504)
    # says nothing about the implementation: every float16 implementation returns inf there.
    if not representable((want_hs, want_final, want_grads), case.dtype):
        if inside_property:
            reject()
        raise ValueError(f"{case!r}: the exact results exceed the range of {case.dtype}; nothing to check")
    hs, final = _call("outputs", context, adapter.forward, arrays.params, arrays.xs, arrays.state,
                      integration_mode=mode)
    _compare(tracker, "outputs", "hs", hs, want_hs, tol, context)
    layers = case.num_layers
    for layer, (got, want) in enumerate(zip(_pairs(final, layers), _pairs(want_final, layers))):
        suffix = f"[layer {layer}]" if layers > 1 else ""
        _compare(tracker, "final_state", "h_T" + suffix, got[0], want[0], tol, context)
        _compare(tracker, "final_state", "c_T" + suffix, got[1], want[1], tol, context)
    if not gradients:
        return
    got = _call("gradients", context, adapter.gradients, arrays.params, arrays.xs, arrays.state,
                arrays.d_hs, arrays.d_state, integration_mode=mode)
    got_layers, want_layers = ([got], [want_grads]) if layers == 1 else (got, want_grads)
    for layer, (g, w) in enumerate(zip(got_layers, want_layers)):
        suffix = f"[layer {layer}]" if layers > 1 else ""
        missing = sorted(set(w) - set(g))
        if missing:
            raise ConformanceError(f"gradients{suffix} lack {missing} [{context}]", "gradients")
        for key in w:
            _compare(tracker, "gradients", f"d_{key}{suffix}", g[key], w[key], tol, context)


# ---- running the property for one adapter and dtype ----

def check(adapter, dtype: str, *, settings: hypothesis_settings | None = None,
          raise_on_failure: bool = False, seed: int | None = None, on_example=None,
          **strategy_options) -> list[CheckResult]:
    """Run the suite for one adapter and dtype; one result per check in :data:`CHECKS`.

    With ``raise_on_failure`` (as the pytest adapters use it) a failure raises after shrinking, so
    pytest shows Hypothesis's own report; otherwise it is recorded in the results. ``seed`` fixes
    Hypothesis's random draws (with ``database=None`` in ``settings`` a run is then reproducible);
    ``on_example(n)`` is called before the n-th example runs (the runner's progress display).
    """
    device = adapter_device(adapter)
    tol = tolerance(dtype, device)
    gradients = has_gradients(adapter)
    results = {c: CheckResult(adapter.name, device, dtype, c, tol) for c in CHECKS}
    if not gradients:
        results["gradients"].status = "skip"
        results["gradients"].message = "the adapter has no gradients()"
    tracker = _Tracker(results, dtype)

    @given(case=cases(dtype, adapter, **strategy_options))
    def property_(case):
        __tracebackhide__ = True
        tracker.examples += 1
        if on_example is not None:
            on_example(tracker.examples)
        try:
            check_case(adapter, case, tracker, tol, gradients)
        except ConformanceError as exc:
            tracker.failure = (exc.check, str(exc), case)
            raise ConformanceError(f"{exc}\nReproduce: {reproducer(adapter, case)}", exc.check) from exc

    if settings is not None:
        property_ = settings(property_)
    if seed is not None:
        property_ = hypothesis_seed(seed)(property_)
    try:
        property_()
    except ConformanceError:
        if raise_on_failure:
            raise
    for result in results.values():
        if result.status != "skip":
            result.examples = tracker.examples
        if not result.worst_error <= tol:  # also examples seen while shrinking another failure
            result.status = "fail"
            result.message = f"worst relative error {result.worst_error:.2e} at {result.worst_at} > tolerance {tol:.0e}"
    if tracker.failure is not None:
        check_name, message, case = tracker.failure
        failed = results[check_name]
        failed.status, failed.message = "fail", message
        failed.reproducer = reproducer(adapter, case) if case is not None else ""
    return list(results.values())


def reproducer(adapter, case: Case) -> str:
    """Python that reruns one example against the same adapter."""
    return (
        "from mlstm_spec.conformance import Case, reproduce\n"
        f"reproduce(ADAPTER, {case!r})  # ADAPTER: the {adapter.name!r} adapter on {adapter_device(adapter)}"
    )


def reproduce(adapter, case: Case) -> None:
    """Run one case against an adapter, raising :class:`ConformanceError` on a mismatch."""
    tracker = _Tracker({c: CheckResult(adapter.name, adapter_device(adapter), case.dtype, c, 0.0) for c in CHECKS},
                       case.dtype)
    check_case(adapter, case, tracker, tolerance(case.dtype, adapter_device(adapter)), has_gradients(adapter),
               inside_property=False)
