"""``mlstm-conformance``: check every installed mLSTM backend, on every device, against ``mlstm_spec``.

With no arguments it finds the installed frameworks among torch, JAX and TensorFlow (importing only
those that are installed; the others become "skip" rows with the reason), every device each one sees,
and runs the property-based suite of :mod:`mlstm_spec.conformance` on each (implementation, device,
dtype): forward outputs, final states and all gradients, over drawn shapes and options. Outside
implementations plug in with ``--impl module.path:factory``. See docs/conformance.md.

The spec's own low-precision path (row ``mlstm_spec``: float32/float16 computation against the float64
oracle) is part of a default run; it is cheap and it checks the oracle's rounding. It does not count
as an implementation: a machine with no framework and no ``--impl`` still exits 3.
"""

from __future__ import annotations

import argparse
import datetime
import importlib
import importlib.metadata
import importlib.util
import logging
import os
import platform
import random
import sys
import threading
import time
import warnings
from dataclasses import dataclass, field

from . import lanes
from .calls import DEFAULT_TIMEOUT
from .cases import SPURIOUS_PRODUCT_WARNING
from .report import (EXIT_FAIL, EXIT_NOTHING_CHECKED, EXIT_PASS, EXIT_USAGE, Report, markdown, plain_text,
                     print_rich, to_json)
from .tolerances import DTYPES, device_kind

try:  # the registry of backends (framework-free); absent where only mlstm_spec is installed
    import backends
    from backends import BACKENDS
except ImportError:
    backends, BACKENDS = None, {}

SPEC = "mlstm_spec"
FRAMEWORK_BACKENDS = tuple(BACKENDS)
BACKEND_NAMES = (SPEC,) + FRAMEWORK_BACKENDS
ALIASES = {"spec": SPEC, "tf": "tensorflow"}
PROFILES = ("default", "ci", "thorough")
#: Outside packages register adapter factories here (see docs/conformance.md, "Entry points").
ENTRY_POINT_GROUP = "mlstm_spec.conformance_adapters"
INSTALL_HINT = "pip install 'mlstm-spec[conformance]'"

EPILOG = f"""\
targets:
  With no --backends and no --impl: the spec's own float32/float16 path ({SPEC}), every installed
  backend among {', '.join(FRAMEWORK_BACKENDS)}, on every device each sees, and every adapter that an
  installed package registers in the entry-point group {ENTRY_POINT_GROUP}. A backend that is not
  installed, or a GPU that is not present, is a "skip" row with the reason. --impl alone checks only
  the given implementation(s); add --backends to check backends as well.

tiers:
  Each implementation, device and dtype gets the small tier (Hypothesis draws, shrunk on failure) and
  the large tier (the profile's fixed list of realistic shapes, each checked once).

exit status:
  {EXIT_PASS}  every check that ran passed
  {EXIT_FAIL}  at least one check failed
  {EXIT_USAGE}  usage error, or a requested backend, device or --impl is not available
  {EXIT_NOTHING_CHECKED}  nothing could be checked (no backend installed and no --impl, or the
     conformance extra is missing: {INSTALL_HINT})

examples:
  mlstm-conformance
  mlstm-conformance --backends torch --devices gpu --dtypes float32 --profile thorough
  mlstm-conformance --impl my_package.conformance:make_adapter --markdown report.md
"""


class UsageError(Exception):
    """A request that cannot be honoured: exit status 2."""


# ---- arguments ----

def _comma_list(text: str) -> list[str]:
    items = [item.strip() for item in text.split(",") if item.strip()]
    if not items:
        raise argparse.ArgumentTypeError("expected a comma-separated list, got an empty one")
    return items


def _int_at_least(minimum: int):
    """argparse type: an integer >= ``minimum``."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"expected an integer >= {minimum}, got {value}")
        return value

    return parse


def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number of seconds, got {text!r}") from None
    if not value >= 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"expected a finite number of seconds >= 0, got {text}")
    return value


def _describe_profiles() -> str:
    try:
        from .profiles import EXAMPLES
    except ImportError:  # no Hypothesis: --help still works
        return ", ".join(PROFILES)
    return ", ".join(f"{name} ({EXAMPLES[name]} examples{', derandomized' if name == 'ci' else ''})"
                     for name in PROFILES)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="mlstm-conformance",
        description="Check mLSTM implementations against the NumPy spec mlstm_spec with the property-based "
                    "conformance suite (outputs, final states, gradients; drawn shapes, options, dtypes).",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--backends", type=_comma_list, metavar="LIST",
                        help=f"comma-separated, from {', '.join(BACKEND_NAMES)}, or 'all' or 'none' "
                             "(default: all; with --impl: none). A requested backend that is not "
                             f"installed is an error (exit {EXIT_USAGE}).")
    parser.add_argument("--devices", type=_comma_list, metavar="LIST",
                        help="'cpu', 'gpu' (any GPU the framework sees) or exact names such as 'cuda:1' "
                             "(default: every device each backend sees). A requested device that a "
                             f"selected backend does not see is an error (exit {EXIT_USAGE}).")
    parser.add_argument("--dtypes", type=_comma_list, metavar="LIST",
                        help=f"from {', '.join(DTYPES)} (default: every dtype each implementation "
                             "supports on its device; one it does not support is a 'skip' row)")
    parser.add_argument("--impl", action="append", default=[], metavar="MODULE:FACTORY",
                        help="check an outside implementation: MODULE is imported (the current "
                             "directory is on sys.path) and FACTORY() must return an adapter "
                             "(see docs/conformance.md). May be given more than once.")
    parser.add_argument("--profile", choices=PROFILES,
                        help=f"Hypothesis profile: {_describe_profiles()} (default: $MLSTM_PROFILE, "
                             "else ci when $CI is set, else default)")
    parser.add_argument("--max-examples", type=_int_at_least(1), metavar="N",
                        help="small-tier examples per implementation, device and dtype (overrides the profile)")
    parser.add_argument("--tiers", type=_comma_list, metavar="LIST", default=["small", "large"],
                        help="which size tiers to run: small (drawn and shrunk by Hypothesis), large (the "
                             "profile's fixed list of realistic shapes); default: both")
    parser.add_argument("--seed", type=_int_at_least(0), metavar="N",
                        help="draw the examples from this seed, so that the run is reproducible (a run "
                             "without --seed draws one and prints it)")
    parser.add_argument("--timeout", type=_seconds, metavar="SECONDS", default=None,
                        help=f"a call into an implementation that has not returned after this many seconds "
                             f"is a failure of that implementation, which is then not called again "
                             f"(default: {DEFAULT_TIMEOUT:g}; 0: no limit)")
    parser.add_argument("--no-diagnosis", action="store_true",
                        help="do not try the known mLSTM variants on an implementation that fails")
    parser.add_argument("--jobs", type=_int_at_least(1), metavar="N", default=None,
                        help="run the checks in up to N processes, one per group of dtypes (default: 2 "
                             "where the machine has 2 or more CPU cores, else 1; 1: all in this process)")
    parser.add_argument("--lane-results", metavar="PATH", help=argparse.SUPPRESS)  # a child of --jobs
    parser.add_argument("--json", metavar="PATH", help="also write the report as JSON")
    parser.add_argument("--markdown", metavar="PATH", help="also write the report as Markdown")
    return parser


# ---- what is checked ----

@dataclass
class Target:
    """One adapter on one device, and the dtypes to check it in."""

    label: str  # the implementation column before an adapter exists
    device: str
    adapter: object
    dtypes: list
    setup: str  # Python that builds ADAPTER, for the reproducers
    counts: bool = True  # False: the spec's own path in a default run (not an implementation)
    backend: str | None = None
    abandoned: bool = False  # a call timed out: not called again (no diagnosis either)
    module: object = None  # the backends.<name> module of a backend target


@dataclass
class Plan:
    targets: list = field(default_factory=list)
    rows: list = field(default_factory=list)  # skip rows, and fail rows of backends that broke on setup
    seen: dict = field(default_factory=dict)  # backend -> the devices it sees


def _skip_row(implementation, device, reason, dtype="-", check="-"):
    from .suite import CheckResult

    return CheckResult(implementation, device, dtype, check, None, status="skip", message=reason)


def _fail_row(implementation, device, message, dtype="-", check="setup"):
    from .suite import CheckResult

    return CheckResult(implementation, device, dtype, check, None, status="fail", message=message)


def _error_text(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}"


def _select_backends(requested: list | None, impls: list, plugins=None) -> tuple[list, bool]:
    """Names to check (backends, then registered adapters), and whether the user named them (then
    each must be available)."""
    plugins = plugins or {}
    everything = list(BACKEND_NAMES) + [name for name in plugins if name not in BACKEND_NAMES]
    if requested is None:
        return ([] if impls else everything), False
    names = [ALIASES.get(name.lower(), name.lower()) if name.lower() in ALIASES or name.lower() in BACKEND_NAMES
             else name for name in requested]
    if "none" in names:
        if len(names) > 1:
            raise UsageError("--backends none cannot be combined with other names")
        return [], True
    if "all" in names:
        if len(names) > 1:
            raise UsageError("--backends all cannot be combined with other names")
        return everything, False
    unknown = [n for n in names if n not in everything]
    if unknown:
        raise UsageError(f"--backends: unknown backend(s) {', '.join(unknown)}; "
                         f"choose from {', '.join(everything)}, all, none")
    return list(dict.fromkeys(names)), True


def _wanted_devices(backend: str, seen: list, requested: list | None, explicit: bool) -> tuple[list, list]:
    """The devices of ``seen`` that ``requested`` names, and the requested ones it does not see. A
    backend the user named (``explicit``) must see every device asked for; another one that does not
    is a skip row, so that ``--devices gpu`` checks the backends that have a GPU."""
    if requested is None:
        return list(seen), []
    chosen, absent = [], []
    for token in requested:
        lowered = token.lower()
        if lowered in ("cpu", "gpu"):
            matches = [d for d in seen if device_kind(d) == lowered]
            problem = f"no {lowered.upper()} visible to {backend}"
        else:
            matches = [d for d in seen if d.lower() == lowered]
            problem = f"{backend} does not see a device {token!r}"
        if not matches:
            if explicit:
                raise UsageError(f"--devices {token}: {problem} (it sees: {', '.join(seen) or 'nothing'})")
            absent.append((token, f"{problem} (it sees: {', '.join(seen) or 'nothing'})"))
        chosen += [d for d in matches if d not in chosen]
    return chosen, absent


def _add_target(plan: Plan, target: Target, requested_dtypes: list | None) -> None:
    from .suite import adapter_dtypes

    offered = list(adapter_dtypes(target.adapter))
    if requested_dtypes is None:
        target.dtypes = offered
    else:
        target.dtypes = [d for d in offered if d in requested_dtypes]
        for dtype in requested_dtypes:
            if dtype not in offered:
                plan.rows.append(_skip_row(target.adapter.name, target.device,
                                           f"{target.adapter.name} on {target.device} does not offer "
                                           f"{dtype} (it offers {', '.join(offered) or 'none'})", dtype))
    plan.targets.append(target)


def _plan_spec(plan: Plan, args, explicit: bool) -> None:
    from .defects import SpecAdapter

    wants_cpu = args.devices is None or any(
        d.lower() == "cpu" for d in args.devices)
    if not wants_cpu:
        if explicit:
            raise UsageError(f"--devices {','.join(args.devices)}: {SPEC} (NumPy) runs on the CPU only")
        plan.rows.append(_skip_row(SPEC, "cpu", "--devices excludes the CPU, where the NumPy spec runs"))
        return
    target = Target(SPEC, "cpu", SpecAdapter(), [],
                    "from mlstm_spec.conformance.defects import SpecAdapter\nADAPTER = SpecAdapter()",
                    counts=explicit)
    _add_target(plan, target, args.dtypes)


def _plan_backend(plan: Plan, name: str, args, explicit: bool) -> None:
    reason = backends.missing_reason(name)
    if reason is not None:
        if explicit:
            raise UsageError(f"--backends requests {name}, but {reason}")
        plan.rows.append(_skip_row(name, "-", reason))
        return
    try:
        module = backends.load(name)
        seen = [str(d) for d in module.devices()]
    except Exception as exc:  # the framework is installed but the backend is broken: a failure
        plan.rows.append(_fail_row(name, "-", f"backends.{name} could not be loaded: {_error_text(exc)}"))
        return
    plan.seen[name] = seen
    devices, absent = _wanted_devices(name, seen, args.devices, explicit)
    for token, why in absent:
        plan.rows.append(_skip_row(name, token.lower() if token.lower() in ("cpu", "gpu") else token, why))
    if args.devices is None and not any(device_kind(d) == "gpu" for d in seen):
        plan.rows.append(_skip_row(name, "gpu", f"no GPU visible to {name}"))
    for device in devices:
        try:
            adapter = module.ConformanceAdapter(device)
        except Exception as exc:
            plan.rows.append(_fail_row(name, device, f"backends.{name}.ConformanceAdapter({device!r}) "
                                                     f"raised {_error_text(exc)}"))
            continue
        setup = f"from backends.{name} import ConformanceAdapter\nADAPTER = ConformanceAdapter({device!r})"
        _add_target(plan, Target(name, device, adapter, [], setup, backend=name, module=module), args.dtypes)


# ---- outside implementations: --impl and the entry-point group ----

def entry_points() -> list:
    """The adapters registered by installed distributions in :data:`ENTRY_POINT_GROUP`."""
    found = importlib.metadata.entry_points()
    group = (found.select(group=ENTRY_POINT_GROUP) if hasattr(found, "select")
             else found.get(ENTRY_POINT_GROUP, []))
    return sorted(group, key=lambda ep: ep.name)


def _plan_entry_point(plan: Plan, entry, args) -> None:
    label = f"{ENTRY_POINT_GROUP}:{entry.name}"
    try:
        factory = entry.load()
    except Exception as exc:  # an installed plug-in that cannot be imported: a failure, like a broken backend
        plan.rows.append(_fail_row(entry.name, "-", f"the entry point {entry.name} = {entry.value} "
                                                    f"({ENTRY_POINT_GROUP}) could not be loaded: {_error_text(exc)}"))
        return
    module_name, _, attribute = entry.value.partition(":")
    setup = f"import {module_name}\nADAPTER = {module_name}.{attribute.strip()}()"
    try:
        adapter = _adapter_from_factory(label, factory, attribute or entry.value)
    except UsageError as exc:
        plan.rows.append(_fail_row(entry.name, "-", str(exc)))
        return
    from .suite import adapter_device

    device = adapter_device(adapter)
    if args.devices is not None and not any(token.lower() in (device.lower(), device_kind(device))
                                            for token in args.devices):
        plan.rows.append(_skip_row(adapter.name, device, f"--devices excludes {device}, where {label} runs"))
        return
    _add_target(plan, Target(adapter.name, device, adapter, [], setup), args.dtypes)


def load_impl(spec: str):
    """Import ``module.path:factory`` (current directory on sys.path), call it, validate the adapter."""
    module_name, sep, attribute = spec.partition(":")
    if not sep or not module_name or not attribute:
        raise UsageError(f"--impl {spec}: expected MODULE:FACTORY, e.g. my_package.checks:make_adapter")
    if os.getcwd() not in sys.path and "" not in sys.path:
        sys.path.insert(0, os.getcwd())
    try:
        module = importlib.import_module(module_name)
    except (Exception, SystemExit) as exc:
        raise UsageError(f"--impl {spec}: cannot import {module_name}: {_error_text(exc)}") from exc
    factory = module
    for part in attribute.split("."):
        try:
            factory = getattr(factory, part)
        except AttributeError:
            raise UsageError(f"--impl {spec}: {module_name} has no attribute {attribute!r}") from None
    adapter = _adapter_from_factory(f"--impl {spec}", factory, attribute)
    setup = (f"import sys\nsys.path.insert(0, {_import_root(module, module_name)!r})\nimport {module_name}\n"
             f"ADAPTER = {module_name}.{attribute}()")
    return adapter, setup


def _adapter_from_factory(label: str, factory, attribute: str):
    """Call a factory and check that what it returns is an adapter; raises :class:`UsageError`."""
    if not callable(factory):
        raise UsageError(f"{label}: {attribute} is not callable (it is a {type(factory).__name__})")
    try:
        adapter = factory()
    except (Exception, SystemExit) as exc:
        raise UsageError(f"{label}: {attribute}() raised {_error_text(exc)}") from exc
    problems = []
    if not isinstance(getattr(adapter, "name", None), str) or not adapter.name:
        problems.append("a non-empty str attribute 'name'")
    if not callable(getattr(adapter, "forward", None)):
        problems.append("a method forward(params, xs, state, *, integration_mode)")
    for optional in ("gradients", "supports"):
        if getattr(adapter, optional, None) is not None and not callable(getattr(adapter, optional)):
            problems.append(f"'{optional}' to be a method (or absent)")
    dtypes = getattr(adapter, "dtypes", None)
    if dtypes is not None:
        unknown = [d for d in dtypes if d not in DTYPES] if isinstance(dtypes, (list, tuple)) else [dtypes]
        if unknown:
            problems.append(f"'dtypes' to be a tuple of names from {', '.join(DTYPES)} (got {dtypes!r})")
    if problems:
        raise UsageError(f"{label}: the adapter {type(adapter).__name__} returned by {attribute}() needs "
                         + "; ".join(problems) + " (see docs/conformance.md)")
    return adapter


def _import_root(module, module_name: str) -> str:
    """The sys.path entry ``module_name`` was imported from (for the reproducers)."""
    file = getattr(module, "__file__", None)
    if not file:
        return os.getcwd()
    path = os.path.abspath(file)
    levels = module_name.count(".") + (2 if os.path.basename(path) == "__init__.py" else 1)
    for _ in range(levels):
        path = os.path.dirname(path)
    return path


def _check_output_path(option: str, path: str) -> None:
    """Fail before the run, not after it, when the report cannot be written to ``path``."""
    directory = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(directory):
        raise UsageError(f"{option} {path}: the directory {directory} does not exist")
    if os.path.isdir(path):
        raise UsageError(f"{option} {path}: is a directory")
    existed = os.path.lexists(path)
    try:
        with open(path, "a", encoding="utf-8"):
            pass
    except OSError as exc:
        raise UsageError(f"{option} {path}: cannot be written ({exc.strerror or exc})") from None
    if not existed:
        os.remove(path)


def plan_run(args) -> Plan:
    """Everything the run will check, and the rows it cannot; raises :class:`UsageError`."""
    from .suite import adapter_device

    for option, path in (("--json", args.json), ("--markdown", args.markdown)):
        if path:
            _check_output_path(option, path)
    unknown_tiers = [t for t in args.tiers if t not in ("small", "large")]
    if unknown_tiers:
        raise UsageError(f"--tiers: unknown tier(s) {', '.join(unknown_tiers)}; choose from small, large")
    if args.dtypes is not None:
        unknown = [d for d in args.dtypes if d not in DTYPES]
        if unknown:
            raise UsageError(f"--dtypes: unknown dtype(s) {', '.join(unknown)}; choose from {', '.join(DTYPES)}")
    plugins = {} if args.impl and args.backends is None else {ep.name: ep for ep in entry_points()}
    names, explicit = _select_backends(args.backends, args.impl, plugins)
    plan = Plan()
    impl_targets = []
    for spec in args.impl:  # before the backends: a bad --impl fails before any framework is imported
        adapter, setup = load_impl(spec)
        impl_targets.append(Target(adapter.name, adapter_device(adapter), adapter, [], setup))
    for name in names:
        if name == SPEC:
            _plan_spec(plan, args, explicit)
        elif name in FRAMEWORK_BACKENDS:
            _plan_backend(plan, name, args, explicit)
        else:
            _plan_entry_point(plan, plugins[name], args)
    for target in impl_targets:
        _add_target(plan, target, args.dtypes)
    _require_requested_gpu(plan, args)
    return plan


def _require_requested_gpu(plan: Plan, args) -> None:
    """A GPU asked for with --devices that no selected implementation sees is an error, not a run of
    nothing but skip rows."""
    if args.devices is None:
        return
    gpu_tokens = [t for t in args.devices if t.lower() != "cpu"]
    if not gpu_tokens or any(device_kind(t.device) == "gpu" for t in plan.targets):
        return
    seen = "; ".join(f"{name} sees: {', '.join(devices) or 'nothing'}" for name, devices in plan.seen.items())
    raise UsageError(f"--devices {','.join(args.devices)}: no selected implementation sees "
                     f"{'a GPU' if [t.lower() for t in gpu_tokens] == ['gpu'] else ', '.join(gpu_tokens)}"
                     + (f" ({seen})" if seen else ""))


# ---- Hypothesis settings ----

def suite_settings(profile: str, max_examples: int | None = None):
    """The profile's settings without the example database: a run replays nothing from earlier runs
    (all adapters share one property function, so saved examples would leak between them).

    Only ``ci`` is derandomized. (Hypothesis, seeing ``CI`` in the environment when the profiles were
    registered, would otherwise have made every profile derandomized.)"""
    from hypothesis import settings

    changes = {"database": None, "derandomize": profile == "ci"}
    if max_examples is not None:
        changes["max_examples"] = max_examples
    return settings(settings.get_profile(profile), **changes)


# ---- progress ----

class PlainProgress:
    """One line per finished (implementation, device, dtype), for logs that are not a terminal."""

    def __init__(self, stream, total):
        self.stream, self.total, self.done = stream, total, 0
        self.lock = threading.Lock()  # lines come from this process and from --jobs children

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False

    def start(self, label, max_examples):
        pass

    def example(self, n):
        pass

    def finish(self, label, results, seconds):
        self.finished_elsewhere(label, *_verdict(results), seconds)

    def finished_elsewhere(self, label, verdict, examples, seconds):
        with self.lock:
            self.done += 1
            print(f"[{self.done}/{self.total}] {label}: {verdict} ({examples} examples, {seconds:.1f} s)",
                  file=self.stream, flush=True)


class ChildProgress(PlainProgress):
    """A --jobs child's progress: one line per finished unit on standard output, for the parent to show."""

    def __init__(self):
        super().__init__(sys.stdout, 0)

    def finished_elsewhere(self, label, verdict, examples, seconds):
        print(lanes.progress_line(label, verdict, examples, seconds), file=self.stream, flush=True)


class RichProgress:
    """A live display: one bar per (implementation, device, dtype), the current one moving."""

    def __init__(self, console, total):
        from rich.progress import (BarColumn, MofNCompleteColumn, Progress, SpinnerColumn, TextColumn,
                                   TimeElapsedColumn)

        self.progress = Progress(SpinnerColumn(), TextColumn("{task.description:<34}"), BarColumn(),
                                 MofNCompleteColumn(), TextColumn("{task.fields[status]}"),
                                 TimeElapsedColumn(), console=console)
        self.overall = self.progress.add_task("total", total=total, status="")
        self.task = None

    def __enter__(self):
        self.progress.__enter__()
        return self

    def __exit__(self, *exc):
        return self.progress.__exit__(*exc)

    def start(self, label, max_examples):
        self.max_examples = max_examples
        self.task = self.progress.add_task(label, total=max_examples, status="")

    def example(self, n):
        status = f"shrinking (example {n})" if n > self.max_examples else ""
        self.progress.update(self.task, completed=min(n, self.max_examples), status=status)

    def finish(self, label, results, seconds):
        verdict, examples = _verdict(results)
        self.progress.update(self.task, completed=self.max_examples, status=self._status(verdict, examples))
        self.progress.advance(self.overall)

    def finished_elsewhere(self, label, verdict, examples, seconds):
        """A unit a --jobs child ran: one finished bar (its own display is not shown)."""
        self.progress.add_task(label, total=1, completed=1, status=self._status(verdict, examples))
        self.progress.advance(self.overall)

    @staticmethod
    def _status(verdict, examples) -> str:
        style = {"pass": "green", "FAIL": "bold red"}.get(verdict.split()[0], "yellow")
        return f"[{style}]{verdict}[/] ({examples} examples)"


def _verdict(results) -> tuple[str, int]:
    failed = [r.check for r in results if r.status == "fail"]
    examples = max((r.examples for r in results), default=0)
    return ("FAIL " + ", ".join(failed) if failed else "pass"), examples


# ---- running ----

def run_target(target: Target, dtype: str, settings, seed, progress, large, timeout, small=True) -> list:
    from .cases import LARGE_SHAPES
    from .suite import check, tolerance

    label = f"{target.adapter.name} {target.device} {dtype}"
    progress.start(label, settings.max_examples * small + len(LARGE_SHAPES.get(large, ())))
    started = time.perf_counter()
    try:
        results = check(target.adapter, dtype, settings=settings, seed=seed, on_example=progress.example,
                        large=LARGE_SHAPES.get(large, ()), timeout=timeout, small=small)
    except Exception as exc:  # e.g. an unknown dtype
        try:
            tol = tolerance(dtype, target.device)
        except KeyError:
            tol = None
        results = [_fail_row(target.adapter.name, target.device,
                             f"the suite could not run: {_error_text(exc)}", dtype, "suite")]
        results[0].tolerance = tol
    for result in results:
        if result.reproducer:
            result.reproducer = target.setup + "\n" + result.reproducer
        for failure in getattr(result, "failures", None) or []:
            if failure.get("reproducer"):
                failure["reproducer"] = target.setup + "\n" + failure["reproducer"]
    progress.finish(label, results, time.perf_counter() - started)
    return results


def diagnose_target(target: Target, timeout) -> dict:
    """The diagnosis of a failing target (see mlstm_spec.conformance.diagnosis), as a report entry."""
    from .diagnosis import diagnose

    try:
        found = diagnose(target.adapter, timeout=timeout)
        entry = found.as_dict()
        dtype = "float64" if "float64" in target.dtypes or found.cases_run == 0 else "float32"
    except Exception as exc:  # noqa: BLE001 - a diagnosis must never hide the report
        entry, dtype = {"matches": [], "text": f"no diagnosis: it raised {_error_text(exc)}"}, "-"
    return {"implementation": target.adapter.name, "device": target.device, "dtype": dtype} | entry


def _versions(plan: Plan, results: list) -> dict:
    import hypothesis
    import numpy

    from .. import __version__

    out = {"python": platform.python_version(), "mlstm_spec": __version__, "numpy": numpy.__version__,
           "hypothesis": hypothesis.__version__}
    # What each backend reports of itself (its versions()). The torch backend names its compiled CPU
    # loops there, and naming them builds them (a minute on a busy machine): a backend that has such
    # loops is asked only where its CPU rows were checked, and otherwise named by its framework alone.
    checked = {(r.implementation, r.device) for r in results if r.status != "skip" and r.check != "setup"}
    for name in dict.fromkeys(t.backend for t in plan.targets if t.backend is not None):
        targets = [t for t in plan.targets if t.backend == name]
        module = targets[0].module if targets[0].module is not None else backends.load(name)
        cpu_checked = any(device_kind(t.device) == "cpu" and (t.adapter.name, t.device) in checked
                          for t in targets)
        if hasattr(module, "compiled_cpu_loops") and not cpu_checked:
            framework = BACKENDS[name].framework if name in BACKENDS else name
            if framework in sys.modules:
                out[framework] = str(getattr(sys.modules[framework], "__version__", "?"))
            continue
        out.update(getattr(module, "versions", dict)())
    for target in plan.targets:
        if target.backend is None and target.label != SPEC:
            top = type(target.adapter).__module__.split(".")[0]
            for name in (top, top.replace("_", "-")):
                try:
                    out.setdefault(name, importlib.metadata.version(name))
                    break
                except importlib.metadata.PackageNotFoundError:
                    continue
    return out


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            for line in cpuinfo:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def describe_device(backend: str | None, device: str) -> str:
    """A human name for a device (best effort: the GPU model when the framework says it)."""
    if device_kind(device) == "cpu":
        return f"{_cpu_name()} ({os.cpu_count()} cores)"
    if backend is not None:
        try:
            return backends.load(backend).describe_device(device)
        except Exception:  # noqa: BLE001 - best effort: the device's own name
            pass
    return device


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    from . import MISSING_DEPENDENCY

    if MISSING_DEPENDENCY:
        print(f"mlstm-conformance: {MISSING_DEPENDENCY}", file=sys.stderr)
        return EXIT_NOTHING_CHECKED
    from .._env import set_framework_environment

    set_framework_environment()  # before any framework is imported: quiet logs, no GPU memory grab
    # The suite draws many shapes on purpose; TensorFlow's "retracing" warnings would bury the report.
    logging.getLogger("tensorflow").setLevel(logging.ERROR)
    # the spec's products can warn at random (cases.py says why), here also in the diagnosis
    warnings.filterwarnings("ignore", SPURIOUS_PRODUCT_WARNING, RuntimeWarning)
    from .profiles import profile_from_environment

    started = time.perf_counter()
    try:
        profile = args.profile or profile_from_environment()
        plan = plan_run(args)
    except (UsageError, ValueError) as exc:
        print(f"mlstm-conformance: error: {exc}", file=sys.stderr)
        return EXIT_USAGE

    settings = suite_settings(profile, args.max_examples)
    if args.seed is not None:
        seed, seed_source = args.seed, "given"
    elif settings.derandomize:
        seed, seed_source = None, "derandomized"
    else:
        seed, seed_source = random.SystemRandom().randrange(2**32), "drawn"

    timeout = DEFAULT_TIMEOUT if args.timeout is None else args.timeout
    large = profile if "large" in args.tiers else None
    small = "small" in args.tiers
    units = [(target, dtype) for target in plan.targets for dtype in target.dtypes]
    if args.lane_results:  # a child of a --jobs run: its units, reported to the parent
        with ChildProgress() as progress:
            done = [(t, d, run_target(t, d, settings, seed, progress, large, timeout, small)) for t, d in units]
        lanes.write_results(args.lane_results, done)
        return EXIT_PASS
    here, *elsewhere = lanes.split(units, lanes.default_jobs() if args.jobs is None else args.jobs)
    results, counted, failing = [], 0, []
    console = _console()
    progress = (RichProgress(console, len(units)) if console is not None and console.is_terminal
                else PlainProgress(sys.stderr, len(units)))

    def record(target, unit_results):
        nonlocal results, counted
        results += unit_results
        if target.counts and any(r.status != "skip" for r in unit_results):
            counted += 1
        abandoned = any("is not called again" in r.message for r in unit_results)
        if any(r.status == "fail" for r in unit_results) and all(t is not target for t in failing):
            failing.append(target)
        target.abandoned = target.abandoned or abandoned

    with progress:
        children = []
        try:
            children = [lanes.Child(args, profile, seed, lane, progress) for lane in elsewhere]
            for target, dtype in here:
                record(target, run_target(target, dtype, settings, seed, progress, large, timeout, small))
            for child in children:
                for target, dtype, unit_results in child.collect():
                    record(target, unit_results)
        finally:
            for child in children:
                child.stop()
    diagnoses = []
    if not args.no_diagnosis:
        for target in failing:
            if not target.abandoned:
                print(f"diagnosing {target.adapter.name} on {target.device} ...", file=sys.stderr, flush=True)
                diagnoses.append(diagnose_target(target, timeout))
    results += plan.rows
    results.sort(key=_row_order(plan))

    if any(r.status == "fail" for r in results):
        status = EXIT_FAIL
    elif counted == 0:
        status = EXIT_NOTHING_CHECKED
    else:
        status = EXIT_PASS
    from .cases import LARGE_SHAPES

    metadata = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": " ".join(["mlstm-conformance"] + list(sys.argv[1:] if argv is None else argv)),
        "profile": profile,
        "max_examples": settings.max_examples if small else 0,
        "large_tier": [str(shape) for shape in LARGE_SHAPES.get(large, ())],
        "seed": seed,
        "seed_source": seed_source,
        "timeout_s": timeout or None,
        "processes": 1 + len(elsewhere),
        "wall_time_s": round(time.perf_counter() - started, 2),
        "versions": _versions(plan, results),
        "devices": {f"{t.adapter.name} {t.device}": describe_device(t.backend, t.device) for t in plan.targets},
        "examples": {f"{r.implementation} {r.device} {r.dtype}": r.examples
                     for r in results if r.check == "outputs"},
        "examples_by_tier": {f"{r.implementation} {r.device} {r.dtype}": r.examples_by_tier
                             for r in results if r.check == "outputs" and getattr(r, "examples_by_tier", None)},
        "platform": platform.platform(),
    }
    report = Report(results, metadata, status, diagnoses)
    out_console = _console(stdout=True)
    if out_console is not None and out_console.is_terminal:
        print_rich(report, out_console)
    else:
        sys.stdout.write(plain_text(report))
        sys.stdout.flush()
    for option, path, render in (("--json", args.json, to_json), ("--markdown", args.markdown, markdown)):
        if path:
            try:
                with open(path, "w", encoding="utf-8") as out:
                    out.write(render(report))
            except OSError as exc:
                print(f"mlstm-conformance: error: {option} {path}: could not write the report "
                      f"({exc.strerror or exc})", file=sys.stderr)
                status = EXIT_FAIL if status == EXIT_FAIL else EXIT_USAGE
    return status


def _row_order(plan: Plan):
    """Table order: the spec, the backends, outside implementations; then device, dtype, check."""
    from .suite import CHECKS

    names = [SPEC, *FRAMEWORK_BACKENDS] + [t.adapter.name for t in plan.targets if t.backend is None]
    dtype_rank = {d: i for i, d in enumerate(DTYPES)}
    check_rank = {c: i for i, c in enumerate(("setup", "suite") + CHECKS)}

    def key(result):
        impl = names.index(result.implementation) if result.implementation in names else len(names)
        return (impl, result.implementation, device_kind(result.device) if result.device != "-" else "",
                result.device, dtype_rank.get(result.dtype, -1), check_rank.get(result.check, -1))

    return key


def _console(stdout: bool = False):
    """A rich console (stderr for the live display, stdout for the report), or None without rich."""
    if importlib.util.find_spec("rich") is None:
        return None
    from rich.console import Console

    return Console(stderr=not stdout)


if __name__ == "__main__":
    sys.exit(main())
