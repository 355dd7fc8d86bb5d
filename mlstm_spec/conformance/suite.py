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
the first.

:func:`check` runs, for one adapter and dtype, the small tier (Hypothesis draws and shrinks) and the
large tier (a fixed list of realistic shapes, see :mod:`.cases`), and returns one
:class:`CheckResult` per check in :data:`CHECKS`. On every example each check is evaluated on its
own: ``forward`` and ``gradients`` are separate calls, a crash or a wrong shape in one does not stop
the other, and a check that never ran is reported as not run (status ``"skip"`` with the reason),
never as a pass. Each distinct failure is kept with its own reproducer.
"""

from __future__ import annotations

import dataclasses
import inspect
import sys
import traceback
from dataclasses import dataclass, field

import numpy as np
from hypothesis import given, reject, seed as hypothesis_seed, settings as hypothesis_settings, strategies as st
from hypothesis.errors import Unsatisfiable

from ..equations import INTEGRATION_MODES
from .calls import DEFAULT_TIMEOUT, Caller
from .cases import (LARGE_SHAPES, RUNTIME_OPTIONS, VARIANT_OPTIONS, Case, large_case, perturbed_reference,
                    reference_forward, reference_gradients, rounded_reference, spurious_product_warnings_ignored,
                    variants_on, with_clips)
from .tolerances import case_tolerance, judgeable, relative_error, spec_error, tolerance, tolerance_rule

if sys.version_info >= (3, 11):
    _ExceptionGroup = BaseExceptionGroup  # noqa: F821
else:  # Hypothesis depends on the backport there
    from exceptiongroup import BaseExceptionGroup as _ExceptionGroup

CHECKS = ("outputs", "final_state", "gradients")
#: How the report shows a variant of the spec that the adapter does not declare.
NOT_COMPUTED = "not run (adapter does not compute it)"
DEFAULT_DTYPES = ("float64", "float32")
TIERS = ("small", "large")


class ConformanceError(AssertionError):
    """An implementation disagreed with the spec (or crashed); the message says where, by how much,
    and how to reproduce it. ``check`` names the check in :data:`CHECKS` that failed; ``case`` is the
    failing :class:`Case` when there is one."""

    def __init__(self, message: str, check: str = "outputs", case: Case | None = None, kind: str = ""):
        super().__init__(message)
        self.check, self.case, self.kind = check, case, kind


# One class per way of failing, so that Hypothesis, which tells failures apart by exception type and
# origin, shrinks and reports each separately: numbers out of tolerance, a wrong shape or dtype, a
# crash (whose own exception, as context, tells crashes at different places apart). One root cause
# seen by several checks (wrong outputs, hence wrong gradients) stays one failure: each other check
# that fails gets its smallest failing example as its reproducer, without a second shrink.
_FAILURE_CLASSES = {kind: type(f"{kind.title()}Failure", (ConformanceError,), {})
                    for kind in ("mismatch", "shape", "dtype", "unreadable", "missing", "raised", "timeout")}


class _Abandoned(BaseException):
    """A call timed out: stop the run for this adapter (not an Exception, so Hypothesis lets it out)."""


class _EnoughShrinking(BaseException):
    """The shrinking budget is spent: stop, and report the smallest failing examples seen so far."""


#: Examples Hypothesis may spend shrinking failures, beyond the drawn ones. Every example is a call
#: into the implementation, and a JIT backend compiles each new shape: unbounded shrinking of two
#: failures took 800 examples. The smallest failing example seen by then is reported instead.
SHRINK_BUDGET = 100


class _Unrepresentable(Exception):
    pass


@dataclass
class CheckResult:
    implementation: str
    device: str
    dtype: str
    check: str
    tolerance: float | None  # the fixed tolerance of the dtype and device (the ceiling of a per-case one)
    status: str = "pass"  # "pass", "fail" or "skip" (not run: the reason is in message)
    worst_error: float = 0.0  # the largest error over the examples run
    worst_at: str = ""  # e.g. "hs[0, 3, 1] (small example 7)"
    examples: int = 0  # examples in which this check ran, all tiers
    message: str = ""  # the first failure, or why the check did not run
    reproducer: str = ""  # Python that reproduces the first failure
    examples_by_tier: dict = field(default_factory=dict)  # {"small": 25, "large": 6}
    tolerance_rule: str = ""  # how each example's tolerance was set (see tolerances.py)
    worst_ratio: float = 0.0  # the largest error / that example's tolerance (fails above 1)
    failures: list = field(default_factory=list)  # every distinct failure (see Failure)
    #: each variant of the spec (cases.VARIANT_OPTIONS): the examples in which this check ran with it
    #: on, or NOT_COMPUTED where the adapter does not declare it ({} where nothing was run)
    variants: dict = field(default_factory=dict)

    def as_dict(self) -> dict:
        return dataclasses.asdict(self)


@dataclass
class Outcome:
    """One check on one example."""

    status: str  # "pass", "fail", "not run"
    error: float | None = None
    tolerance: float | None = None
    where: str = ""
    message: str = ""
    kind: str = ""  # of a failure: "mismatch", "raised TypeError", "timeout", "shape", "dtype", ...
    exception: BaseException | None = None


@dataclass
class Failure:
    """One distinct failure: what went wrong, on which case, and how to reproduce it."""

    check: str
    kind: str
    message: str
    case: Case
    tier: str
    shrunk: bool  # the smallest failing example Hypothesis found (small tier), or the case as checked
    error: float | None = None
    tolerance: float | None = None
    where: str = ""

    def as_dict(self, adapter) -> dict:
        return {"kind": self.kind, "tier": self.tier, "shrunk": self.shrunk, "error": self.error,
                "tolerance": self.tolerance, "where": self.where, "message": self.message,
                "reproducer": reproducer(adapter, self.case)}


# ---- adapter introspection ----

def adapter_device(adapter) -> str:
    return str(getattr(adapter, "device", "cpu"))


def adapter_dtypes(adapter) -> tuple:
    return tuple(getattr(adapter, "dtypes", DEFAULT_DTYPES))


def supports(adapter, options: dict, declared=None) -> bool:
    """Whether a case (its ``options``) is drawn for the adapter: its variants are among those the
    adapter declares (``declared``, else :func:`declared_variants`) and its ``supports()`` accepts it
    (without ``supports()``: single layers)."""
    on = variants_on(options)
    if on and not on <= (declared_variants(adapter, options.get("dtype", "float64")) if declared is None
                          else declared):
        return False
    ask = getattr(adapter, "supports", None)
    if ask is None:
        return options["num_layers"] == 1
    return bool(ask(options))


def _probes(dtype):
    """(variant, case without it, the same case with it) for asking a ``supports()`` about variants."""
    for mode in ("addition", "multiplicative_integration"):
        base = Case(2, 3, 3, 3, dtype=dtype, integration_mode=mode)
        yield from ((name, base, dataclasses.replace(base, **change)) for name, change in (
            ("proj_size", dict(proj_size=2)), ("peepholes", dict(peepholes=True)), ("cell_clip", dict(cell_clip=1.0)),
            ("proj_clip", dict(proj_size=2, proj_clip=1.0)), ("forget_bias", dict(forget_bias=1.0))))


def _takes_runtime(function) -> bool:
    """Whether ``function`` accepts the run-time options (``**kwargs``, or each by name)."""
    try:
        parameters = inspect.signature(function).parameters.values()
    except (TypeError, ValueError):  # no signature to read: assume it does
        return True
    return any(p.kind is p.VAR_KEYWORD for p in parameters) or \
        set(RUNTIME_OPTIONS) <= {p.name for p in parameters}


def declared_variants(adapter, dtype: str = "float64") -> frozenset:
    """The variants of the spec (:data:`~.cases.VARIANT_OPTIONS`) the suite draws for an adapter.

    - ``adapter.variants`` (the project's adapters set it, see ``backends._common.AdapterBase``);
    - else, for an outside adapter with ``supports(options)`` and no ``variants``: those its
      ``supports()`` accepts on a case it accepts without them. A ``supports()`` that accepts every
      variant is taken to ignore the variant keys (it was written before they existed), so such an
      adapter gets none: set ``variants`` to be checked on all of them;
    - an adapter with neither: none;
    - and none for an adapter whose ``forward`` (or ``gradients``) cannot take the run-time options as
      keyword arguments (no ``**runtime``): it was written before the variants, whatever it inherits
      (a subclass of ``SpecAdapter`` that overrides ``forward`` the old way, say).
    """
    if not all(_takes_runtime(getattr(adapter, name)) for name in ("forward", "gradients")
               if callable(getattr(adapter, name, None))):
        return frozenset()
    named = getattr(adapter, "variants", None)
    if named is not None:
        return frozenset(named) & frozenset(VARIANT_OPTIONS)
    ask = getattr(adapter, "supports", None)
    if not callable(ask):
        return frozenset()
    accepted = set()
    try:
        for name, base, varied in _probes(dtype):
            if name not in accepted and ask(base.options) and ask(varied.options):
                accepted.add(name)
    except Exception:  # noqa: BLE001 - a supports() that cannot answer about variants declares none
        return frozenset()
    return frozenset() if accepted == set(VARIANT_OPTIONS) else frozenset(accepted)


def has_gradients(adapter) -> bool:
    return callable(getattr(adapter, "gradients", None))


# ---- what is drawn ----

#: The run-time forget bias values drawn: 1.0 is TensorFlow's default, -0.5 a negative one.
FORGET_BIASES = (0.0, 1.0, -0.5)


@st.composite
def _with_variants(draw, case: Case, declared: frozenset) -> Case:
    """``case`` with some of the ``declared`` variants switched on, or none (each draw shrinks to off)."""
    if not draw(st.sampled_from((False, True, True, True)), label="variants"):  # shrinks to False
        return case
    proj_size, independent = 0, case.independent_recurrence
    if "proj_size" in declared and case.hidden_size > 1 and draw(st.booleans(), label="projection"):
        proj_size = draw(st.integers(1, case.hidden_size - 1), label="proj_size")
        independent = False  # a projection needs a matrix weight_hh
    peepholes = "peepholes" in declared and draw(st.booleans(), label="peepholes")
    forget_bias = draw(st.sampled_from(FORGET_BIASES), label="forget_bias") if "forget_bias" in declared else 0.0
    cell = "cell_clip" in declared and draw(st.booleans(), label="cell_clip")
    proj = proj_size > 0 and "proj_clip" in declared and draw(st.booleans(), label="proj_clip")
    case = dataclasses.replace(case, proj_size=proj_size, peepholes=peepholes, forget_bias=forget_bias,
                               independent_recurrence=independent)
    return with_clips(case, cell, proj) if cell or proj else case


def cases(dtype: str, adapter=None, *, max_batch=3, max_steps=6, max_size=5, max_layers=2, variants=None):
    """Hypothesis strategy of small :class:`Case` for one dtype, narrowed by the adapter's ``supports``.

    ``variants``: the spec's variants to draw (default: those the adapter declares, see
    :func:`declared_variants`; none without an adapter). In about a quarter of the examples none is
    on; the others switch on each of them with probability 1/2, and every one shrinks to off."""
    if variants is None:
        variants = frozenset() if adapter is None else declared_variants(adapter, dtype)
    declared = frozenset(variants)
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
    if declared:  # drawn after the plain case: without variants the draws are those of before them
        strategy = strategy.flatmap(lambda case: _with_variants(case, declared))
    if adapter is not None:
        strategy = strategy.filter(lambda case: supports(adapter, case.options, declared))
    return strategy


def large_tier_cases(adapter, dtype: str, shapes, seed: int | None, declared=None) -> list:
    """``(shape, case or None, reason)`` for every shape of the large tier: the options of each case
    are drawn from ``seed`` (so a run with the same seed checks the same cases) until the adapter's
    ``supports`` accepts them; a shape it accepts with no options is not run, with the reason. The
    shape's variants are switched on where they are among ``declared`` (default: those the adapter
    declares)."""
    declared = declared_variants(adapter, dtype) if declared is None else frozenset(declared)
    out = []
    for index, shape in enumerate(shapes):
        rng = np.random.default_rng([0 if seed is None else seed, index])
        for _ in range(32):
            case = large_case(shape, dtype, rng, declared)
            if supports(adapter, case.options, declared):
                out.append((shape, case, ""))
                break
        else:
            out.append((shape, None, f"{shape.without(shape.variants - declared)} (supports() declines it)"))
    return out


# ---- comparing one case ----

def _fmt_index(name, index):
    return f"{name}[{', '.join(map(str, index))}]" if index else name


def _context(adapter, case):
    variants = [f"P={case.proj_size}" if name == "proj_size" else name if name == "peepholes" else
                f"{name}={getattr(case, name):g}" for name in VARIANT_OPTIONS if name in case.variants]
    return (f"impl={adapter.name}, device={adapter_device(adapter)}, dtype={case.dtype}, "
            f"B={case.batch}, T={case.steps}, I={case.input_size}, H={case.hidden_size}"
            + (f", layers={case.num_layers}" if case.num_layers > 1 else "")
            + "".join(f", {text}" for text in variants))


class _CheckScore:
    """The tensors of one check on one example, compared one by one."""

    def __init__(self, tolerance, dtype, context):
        self.tolerance, self.dtype, self.context = tolerance, dtype, context
        self.error, self.where, self.failure = 0.0, "", None  # failure: (kind, message)

    def fail(self, kind, message):
        if self.failure is None:
            self.failure = (kind, f"{message} [{self.context}]")

    def compare(self, name, actual, expected):
        expected = np.asarray(expected)
        if not isinstance(actual, np.ndarray):
            try:
                actual = np.asarray(actual)
            except Exception as exc:  # noqa: BLE001 - e.g. a framework tensor NumPy cannot read
                return self.fail("unreadable", f"{name} could not be read as an array ({type(exc).__name__}: {exc})")
        if actual.dtype == object or actual.shape != expected.shape:
            what = f"a {type(actual.flat[0]).__name__} object array" if actual.dtype == object and actual.size \
                else f"shape {actual.shape}"
            return self.fail("shape", f"{name} has {what}, but should have shape {expected.shape}")
        # bfloat16 arrives as ml_dtypes.bfloat16 (kind "V"), or as float32 when ml_dtypes is missing
        exempt = self.dtype == "bfloat16" and actual.dtype.kind != "V"
        if actual.dtype.name != self.dtype and not exempt:
            return self.fail("dtype", f"{name} has dtype {actual.dtype.name}, but should keep the input dtype "
                                      f"{self.dtype}")
        error, index = relative_error(actual, expected)
        where = _fmt_index(name, index)
        if error > self.error or not self.where:
            self.error, self.where = error, where
        if not error <= self.tolerance:
            got = float(np.asarray(actual[index] if index else actual, dtype=np.float64))
            want = float(expected[index] if index else expected)
            self.fail("mismatch", f"{where}={got:.6g}, but should be {want:.6g} (relative error {error:.2e} > "
                                  f"tolerance {self.tolerance:.1e})")

    def outcome(self) -> Outcome:
        if self.failure is not None:
            kind, message = self.failure
            return Outcome("fail", self.error if self.where else None, self.tolerance, self.where, message, kind)
        return Outcome("pass", self.error, self.tolerance, self.where)


def _pairs(final, layers):
    """Final state as a list of (h, c), one per layer, or a message saying why it is not."""
    if layers == 1:
        final = [final]
    if not isinstance(final, (list, tuple)) or len(final) != layers:
        return f"final state should be {layers} (h, c) pair(s), got {type(final).__name__}"
    for pair in final:
        if not isinstance(pair, (list, tuple)) or len(pair) != 2:
            return f"final state should be a pair (h, c), got {type(pair).__name__}"
    return final


def _raised(name, call, context) -> tuple[str, str]:
    if call.timed_out:
        return "timeout", f"{name}() did not return (timed out) [{context}]"
    exc = call.exception
    return f"raised {type(exc).__name__}", f"{name}() raised {type(exc).__name__}: {exc} [{context}]"


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


def _tensor_errors(got, want, layers, grads):
    """{check: max relative error over its tensors} of one set of results against another."""
    hs, final = got[0], _pairs(got[1], layers)
    out = {"outputs": relative_error(hs, want[0])[0]}
    out["final_state"] = max(relative_error(g, w)[0] for gp, wp in zip(final, _pairs(want[1], layers))
                             for g, w in zip(gp, wp))
    if grads is not None:
        got_g, want_g = ([got[2]], [grads]) if layers == 1 else (got[2], grads)
        out["gradients"] = max(relative_error(g[k], w[k])[0] for g, w in zip(got_g, want_g) for k in w)
    return out


def evaluate_case(adapter, case: Case, caller: Caller, gradients: bool) -> dict:
    """Every check of one case, each on its own: ``{check: Outcome}``.

    Raises :class:`_Unrepresentable` when the exact results do not fit the dtype (a float16 gradient
    above 65504 says nothing about an implementation: every float16 implementation returns inf), or
    when the case is too ill-conditioned in the dtype to judge (tolerances.JUDGEABLE_SHARE)."""
    arrays = case.arrays()
    context = _context(adapter, case)
    mode, layers, device = case.integration_mode, case.num_layers, adapter_device(adapter)
    # the spec gets every run-time option; the adapter only those switched on, so that an adapter
    # written before the variants existed is called exactly as before on a case without them
    runtime, switched_on = case.runtime, case.runtime_on
    with spurious_product_warnings_ignored():
        want_hs, want_final = reference_forward(arrays, mode, **runtime)
        want_grads = reference_gradients(arrays, mode, **runtime) if gradients else None
        if not representable((want_hs, want_final, want_grads), case.dtype):
            raise _Unrepresentable(f"{case!r}: the exact results exceed the range of {case.dtype}; nothing to check")
        if case.dtype != "float64":  # the spec in the case's dtype, for its tolerances
            rounded = rounded_reference(arrays, mode, case.dtype, gradients, **runtime)
            moved = perturbed_reference(arrays, mode, case.dtype, gradients, case.seed, **runtime)
    if case.dtype == "float64":
        tolerances = dict.fromkeys(CHECKS, tolerance(case.dtype, device))
    else:  # per case: k times the spec's own rounding in this dtype on this very case (tolerances.py)
        own = _tensor_errors(rounded, (want_hs, want_final), layers, want_grads)
        sensitivity = _tensor_errors(moved, (want_hs, want_final), layers, want_grads)
        spec_errors = {check: spec_error(own[check], sensitivity[check]) for check in own}
        unjudgeable = {c: e for c, e in spec_errors.items() if not judgeable(case.dtype, device, e)}
        if unjudgeable:
            raise _Unrepresentable(f"{case!r}: the spec's own {case.dtype} rounding error ({unjudgeable}) is too "
                                   f"close to the {case.dtype} tolerance to judge; nothing to check")
        tolerances = {c: case_tolerance(case.dtype, device, e) for c, e in spec_errors.items()}
    outcomes = {}

    forward = caller(adapter.forward, arrays.params, arrays.xs, arrays.state, integration_mode=mode, **switched_on)
    if not forward.ok:
        kind, message = _raised("forward", forward, context)
        for name in ("outputs", "final_state"):
            outcomes[name] = Outcome("fail", message=message, kind=kind, exception=forward.exception)
    else:
        result = forward.value
        if not isinstance(result, (list, tuple)) or len(result) != 2:
            message = f"forward() should return (hs, final_state), got {type(result).__name__} [{context}]"
            outcomes["outputs"] = outcomes["final_state"] = Outcome("fail", message=message, kind="shape")
        else:
            hs, final = result
            score = _CheckScore(tolerances["outputs"], case.dtype, context)
            score.compare("hs", hs, want_hs)
            outcomes["outputs"] = score.outcome()
            score = _CheckScore(tolerances["final_state"], case.dtype, context)
            pairs = _pairs(final, layers)
            if isinstance(pairs, str):
                score.fail("shape", pairs)
            else:
                for layer, (got, want) in enumerate(zip(pairs, _pairs(want_final, layers))):
                    suffix = f"[layer {layer}]" if layers > 1 else ""
                    score.compare("h_T" + suffix, got[0], want[0])
                    score.compare("c_T" + suffix, got[1], want[1])
            outcomes["final_state"] = score.outcome()

    if not gradients:
        outcomes["gradients"] = Outcome("not run", message="the adapter has no gradients()")
    elif caller.abandoned:
        outcomes["gradients"] = Outcome("not run", message=caller.abandoned)
    else:
        call = caller(adapter.gradients, arrays.params, arrays.xs, arrays.state, arrays.d_hs, arrays.d_state,
                      integration_mode=mode, **switched_on)
        score = _CheckScore(tolerances["gradients"], case.dtype, context)
        if not call.ok:
            kind, message = _raised("gradients", call, context)
            outcomes["gradients"] = Outcome("fail", message=message, kind=kind, exception=call.exception)
        else:
            got = call.value
            got_layers, want_layers = ([got], [want_grads]) if layers == 1 else (got, want_grads)
            if not isinstance(got_layers, (list, tuple)) or len(got_layers) != layers or not all(
                    isinstance(g, dict) for g in got_layers):
                score.fail("shape", f"gradients() should return {'a dict' if layers == 1 else f'{layers} dicts'} "
                                    f"of arrays, got {type(got).__name__}")
            else:
                for layer, (g, w) in enumerate(zip(got_layers, want_layers)):
                    suffix = f"[layer {layer}]" if layers > 1 else ""
                    missing = sorted(set(w) - set(g))
                    if missing:
                        score.fail("missing", f"gradients{suffix} lack {missing}")
                    for key in w:
                        if key in g:
                            score.compare(f"d_{key}{suffix}", g[key], w[key])
            outcomes["gradients"] = score.outcome()
    return {name: outcomes[name] for name in CHECKS}


# ---- recording ----

@dataclass
class _Record:
    """Everything seen of one check over the examples run."""

    examples: dict = field(default_factory=lambda: dict.fromkeys(TIERS, 0))
    not_run: dict = field(default_factory=dict)  # reason -> examples
    worst_error: float = 0.0
    worst_at: str = ""
    worst_ratio: float = 0.0
    failing: dict = field(default_factory=dict)  # kind -> (smallest failing case, outcome, tier)
    failures: list = field(default_factory=list)  # distinct failures, in the order found
    variants: dict = field(default_factory=dict)  # variant -> examples run with it on


class _Tracker:
    def __init__(self, adapter, dtype):
        self.adapter, self.dtype = adapter, dtype
        self.records = {c: _Record() for c in CHECKS}
        self.examples = dict.fromkeys(TIERS, 0)

    def record(self, tier, case, outcomes):
        self.examples[tier] += 1
        label = f"{tier} example {self.examples[tier]}"
        for name, outcome in outcomes.items():
            record = self.records[name]
            if outcome.status == "not run":
                record.not_run[outcome.message] = record.not_run.get(outcome.message, 0) + 1
                continue
            record.examples[tier] += 1
            for variant in case.variants:
                record.variants[variant] = record.variants.get(variant, 0) + 1
            if outcome.error is not None:
                if outcome.error > record.worst_error or not record.worst_at:
                    record.worst_error, record.worst_at = outcome.error, f"{outcome.where} ({label})"
                if outcome.tolerance:
                    record.worst_ratio = max(record.worst_ratio, outcome.error / outcome.tolerance)
            if outcome.status == "fail":
                known = record.failing.get(outcome.kind)
                if known is None or case.size < known[0].size:
                    record.failing[outcome.kind] = (case, outcome, tier)

    def add_failure(self, check, case, outcome, tier, shrunk):
        record = self.records[check]
        if any(f.kind == outcome.kind for f in record.failures):
            return
        record.failures.append(Failure(check, outcome.kind, outcome.message, case, tier, shrunk,
                                       outcome.error, outcome.tolerance, outcome.where))


def _described(exc: BaseException) -> str:
    """An exception's type and message, and the innermost line of code that raised it."""
    text = f"{type(exc).__name__}: {exc}"
    frames = traceback.extract_tb(exc.__traceback__)
    if frames:
        text += f" (at {frames[-1].filename}:{frames[-1].lineno}, in {frames[-1].name})"
    return text


def _flatten(exc):
    if isinstance(exc, _ExceptionGroup):
        for inner in exc.exceptions:
            yield from _flatten(inner)
    else:
        yield exc


# ---- running the suite for one adapter and dtype ----

def check(adapter, dtype: str, *, settings: hypothesis_settings | None = None,
          raise_on_failure: bool = False, seed: int | None = None, on_example=None,
          large=None, timeout: float | None = DEFAULT_TIMEOUT, small: bool = True,
          **strategy_options) -> list[CheckResult]:
    """Run the suite for one adapter and dtype; one result per check in :data:`CHECKS`.

    - ``settings``: Hypothesis settings of the small tier (default: the active profile's);
    - ``large``: the large tier, a profile name of :data:`~.cases.LARGE_SHAPES` (default: the active
      Hypothesis profile's, else ``"default"``), a sequence of :class:`~.cases.Shape`, or ``()``;
    - ``seed``: fixes Hypothesis's draws and the large tier's options (with ``database=None`` in
      ``settings`` a run is then reproducible);
    - ``timeout``: seconds one adapter call may take (None: no limit);
    - ``small``: run the small tier (False: the large tier only);
    - ``variants``: the spec's variants to draw (names from :data:`~.cases.VARIANT_OPTIONS`; default:
      those the adapter declares, see :func:`declared_variants`);
    - ``on_example(n)``: called before the n-th example runs (the runner's progress display);
    - ``raise_on_failure``: raise :class:`ConformanceError` with the report of every failure (and
      its reproducer) instead of only recording it.
    """
    device = adapter_device(adapter)
    ceiling = tolerance(dtype, device)
    gradients = has_gradients(adapter)
    if strategy_options.get("variants") is None:
        strategy_options["variants"] = declared_variants(adapter, dtype)
    declared = frozenset(strategy_options["variants"])
    tracker = _Tracker(adapter, dtype)
    caller = Caller(timeout)
    counter = [0]

    def step():
        counter[0] += 1
        if on_example is not None:
            on_example(counter[0])

    suite_error = None

    limit = (settings or hypothesis_settings.default).max_examples + SHRINK_BUDGET

    @given(case=cases(dtype, adapter, **strategy_options))
    def property_(case):
        __tracebackhide__ = True
        if counter[0] >= limit and any(r.failing for r in tracker.records.values()):
            raise _EnoughShrinking()
        step()
        try:
            outcomes = evaluate_case(adapter, case, caller, gradients)
        except _Unrepresentable:
            reject()
        tracker.record("small", case, outcomes)
        if caller.abandoned:
            raise _Abandoned(caller.abandoned)
        for name, outcome in outcomes.items():
            if outcome.status == "fail":
                error = _FAILURE_CLASSES[outcome.kind.split()[0]](outcome.message, name, case, outcome.kind)
                error.outcome = outcome
                # a crash's own exception as context: crashes at different places are different failures
                error.__context__ = outcome.exception if isinstance(outcome.exception, BaseException) else None
                raise error

    if settings is not None:
        property_ = settings(property_)
    if seed is not None:
        property_ = hypothesis_seed(seed)(property_)
    try:
        if small:
            property_()
    except (_Abandoned, _EnoughShrinking):
        pass
    except Unsatisfiable as exc:
        suite_error = f"the suite could not run: {type(exc).__name__}: {exc}"
    except BaseException as exc:  # noqa: BLE001 - failures found (one, or a group), or a flaky adapter
        if isinstance(exc, KeyboardInterrupt):
            raise
        leaves = list(_flatten(exc))
        found = [e for e in leaves if isinstance(e, ConformanceError) and e.case is not None]
        if not found:
            suite_error = f"the suite could not run: {type(exc).__name__}: {exc}"
            if leaves != [exc]:  # a group (e.g. Hypothesis's FlakyFailure): what each member raised, and where
                suite_error += "".join(f"\n  - {_described(e)}" for e in leaves)
        flaky = "" if isinstance(exc, ConformanceError) or isinstance(exc, _ExceptionGroup) and all(
            isinstance(e, ConformanceError) for e in exc.exceptions) else \
            f" (Hypothesis: {type(exc).__name__}; the implementation may not give the same result twice)"
        for error in found:
            outcome = getattr(error, "outcome", Outcome("fail", message=str(error), kind=error.kind))
            if flaky:
                outcome = dataclasses.replace(outcome, message=outcome.message + flaky)
            tracker.add_failure(error.check, error.case, outcome, "small", shrunk=True)

    # the large tier: fixed shapes, each checked once
    shapes = _large_shapes(large, settings)
    if not caller.abandoned and suite_error is None:
        for shape, case, reason in large_tier_cases(adapter, dtype, shapes, seed, declared):
            if caller.abandoned:
                break
            if case is None:
                for record in tracker.records.values():
                    record.not_run[reason] = record.not_run.get(reason, 0) + 1
                continue
            step()
            for attempt in range(4):  # a float16 case whose exact results overflow: other values
                try:
                    outcomes = evaluate_case(adapter, case, caller, gradients)
                    break
                except _Unrepresentable:
                    case = dataclasses.replace(case, seed=case.seed + 1)
                    if case.cell_clip is not None or case.proj_clip is not None:  # bounds for the new values
                        case = with_clips(case, case.cell_clip is not None, case.proj_clip is not None)
            else:
                continue
            tracker.record("large", case, outcomes)
    caller.close()
    results = _results(adapter, dtype, ceiling, tracker, gradients, caller, suite_error, declared)
    if raise_on_failure and any(r.status == "fail" for r in results):
        raise ConformanceError(failure_text(results), next(r.check for r in results if r.status == "fail"))
    return results


def _large_shapes(large, settings):
    if large is None:
        profile = hypothesis_settings.get_current_profile_name()
        large = profile if profile in LARGE_SHAPES else "default"
    if isinstance(large, str):
        if large not in LARGE_SHAPES:
            raise ValueError(f"large must be one of {sorted(LARGE_SHAPES)} or a sequence of Shape, got {large!r}")
        return LARGE_SHAPES[large]
    return tuple(large)


def _results(adapter, dtype, ceiling, tracker, gradients, caller, suite_error,
             declared=frozenset()) -> list[CheckResult]:
    device = adapter_device(adapter)
    if suite_error is not None:  # e.g. supports() declines every case: one row says so
        return [CheckResult(adapter.name, device, dtype, "suite", ceiling, status="fail", message=suite_error,
                            tolerance_rule=tolerance_rule(dtype, device))]
    results = []
    for name in CHECKS:
        record = tracker.records[name]
        # every failing kind not already found by Hypothesis: its smallest failing example
        for kind, (case, outcome, tier) in record.failing.items():
            tracker.add_failure(name, case, outcome, tier, shrunk=False)
        result = CheckResult(adapter.name, device, dtype, name, ceiling, worst_error=record.worst_error,
                             worst_at=record.worst_at, examples=sum(record.examples.values()),
                             examples_by_tier=dict(record.examples), tolerance_rule=tolerance_rule(dtype, device),
                             worst_ratio=record.worst_ratio,
                             failures=[f.as_dict(adapter) for f in record.failures],
                             variants={v: record.variants.get(v, 0) if v in declared else NOT_COMPUTED
                                       for v in VARIANT_OPTIONS})
        not_run = "; ".join(reason + (f" ({count} examples)" if count > 1 else "")
                            for reason, count in record.not_run.items())
        if result.failures or record.worst_ratio > 1:
            result.status = "fail"
            result.message = result.failures[0]["message"] if result.failures else (
                f"worst relative error {record.worst_error:.2e} at {record.worst_at} exceeds its tolerance")
            result.reproducer = result.failures[0]["reproducer"] if result.failures else ""
        elif result.examples == 0:
            result.status = "skip"
            result.message = ("not run: the adapter has no gradients()" if name == "gradients" and not gradients
                              else f"not run: {not_run or 'no example was run'}")
        elif not_run:
            result.message = f"not run: {not_run}"
        results.append(result)
    if caller.abandoned:
        for result in results:
            if caller.abandoned not in result.message and "did not return" not in result.message:
                result.message = (result.message + "; " if result.message else "") + caller.abandoned
    return results


def failure_text(results) -> str:
    """Every failure of a list of results, with its reproducer: what ``raise_on_failure`` raises."""
    parts = []
    for result in results:
        if result.status != "fail":
            continue
        title = f"{result.implementation} on {result.device}, {result.dtype}, check {result.check!r}"
        failures = result.failures or [{"message": result.message, "reproducer": result.reproducer}]
        for failure in failures:
            parts.append(f"FAIL: {title}\n    {failure['message']}")
            if failure.get("reproducer"):
                parts.append("Reproduce with:\n" + "\n".join("    " + line
                                                             for line in failure["reproducer"].splitlines()))
    return "\n".join(parts)


def reproducer(adapter, case: Case) -> str:
    """Python that reruns one example against the same adapter."""
    return (
        "from mlstm_spec.conformance import Case, reproduce\n"
        f"reproduce(ADAPTER, {case!r})  # ADAPTER: the {adapter.name!r} adapter on {adapter_device(adapter)}"
    )


def reproduce(adapter, case: Case, *, timeout: float | None = DEFAULT_TIMEOUT) -> None:
    """Run one case against an adapter, raising :class:`ConformanceError` (naming every check that
    fails) on a mismatch. Raises ValueError for a case whose exact results the dtype cannot hold."""
    __tracebackhide__ = True
    caller = Caller(timeout)
    try:
        outcomes = evaluate_case(adapter, case, caller, has_gradients(adapter))
    except _Unrepresentable as exc:
        raise ValueError(str(exc)) from None
    finally:
        caller.close()
    failed = [(name, o) for name, o in outcomes.items() if o.status == "fail"]
    if failed:
        name, first = failed[0]
        raise ConformanceError("\n".join(f"{n}: {o.message}" for n, o in failed), name, case, first.kind)
