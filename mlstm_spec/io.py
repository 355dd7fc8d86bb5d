"""One weight file for every implementation: a stack of canonical layers in a safetensors file.

``save(path, layers, integration_mode=...)`` writes, ``load(path)`` reads and validates. Every backend
moves its weights through it with ``to_canonical`` / ``from_canonical``; RecurrentLayers.jl reads the
same file with SafeTensors.jl (see ``docs/interop.md``).

File layout (format ``mlstm-spec.weights``, versions 1, 2 and 3)
-------------------------------------------------------------------

A standard safetensors file (an 8-byte little-endian header length, a JSON header, then the raw
tensor bytes). Tensors are stored by *logical index*, row-major (C order), little-endian, in the
canonical orientation of :mod:`mlstm_spec` (RecurrentLayers.jl's names and shapes):

==========================  ============  ====================================================
tensor                      shape         present when
==========================  ============  ====================================================
``layers.{l}.weight_ih``    ``(5H, I)``   always; row blocks ``m, i, o, f, z``
``layers.{l}.weight_hh``    ``(H, H)``    always; ``(H,)`` under ``independent_recurrence``
``layers.{l}.weight_mh``    ``(4H, H)``   always; row blocks ``i, o, f, z``
``layers.{l}.bias_ih``      ``(5H,)``     ``bias``
``layers.{l}.bias_hh``      ``(H,)``      ``recurrent_bias``
``layers.{l}.bias_mh``      ``(4H,)``     ``multiplicative_bias``
==========================  ============  ====================================================

Version 2 adds, for a model with the variants of :mod:`mlstm_spec.equations`:

==========================  ============  ====================================================
tensor                      shape         present when
==========================  ============  ====================================================
``layers.{l}.weight_hr``    ``(P, H)``    ``proj_size`` > 0 (``weight_hh`` is then ``(H, P)``)
``layers.{l}.weight_ci``    ``(H,)``      ``peepholes``
``layers.{l}.weight_cf``    ``(H,)``      ``peepholes``
``layers.{l}.weight_co``    ``(H,)``      ``peepholes``
==========================  ============  ====================================================

``l`` runs over ``0 .. num_layers - 1``; layer 0 has ``I`` = the input size, later layers ``I = H``
(``I = P`` with a projection).

Version 3 holds a bidirectional stack (``directions`` = 2, as ``torch.nn.LSTM(bidirectional=True)``):
every layer has a second set of the tensors above, ``layers.{l}.reverse.<name>``, for its reverse
direction, which runs over the time-reversed sequence; layers after the first take both directions'
outputs concatenated (forward first), so their ``I`` is ``2H`` (``2P`` with a projection).
All tensors share one dtype: float16, float32 or float64 (``save`` stores bfloat16 values as float32,
which holds every bfloat16 value exactly).

The header's ``__metadata__`` (string to string) holds:

=====================  ========================================================================
key                    value
=====================  ========================================================================
``format``             ``"mlstm-spec.weights"``
``format_version``     ``"1"``, ``"2"`` for a model that uses a variant, ``"3"`` for two directions
``formulation``        :data:`FORMULATION` (versions 2 and 3: :data:`FORMULATION_V2`), the equations
``layout``             :data:`LAYOUT` (version 2: :data:`LAYOUT_V2`, 3: :data:`LAYOUT_V3`)
``num_layers``         decimal, e.g. ``"2"`` (layers, not directions)
``directions``         version 3 only: ``"2"``; a file without it has one direction
``input_size``         decimal, ``I`` of layer 0
``hidden_size``        decimal, ``H``
``dtype``              ``"float16"``, ``"float32"`` or ``"float64"``
``options``            JSON object: ``bias``, ``recurrent_bias``, ``multiplicative_bias``,
                       ``independent_recurrence`` (booleans) and ``integration_mode``; versions 2
                       and 3 also ``proj_size`` (int, 0: none), ``peepholes`` (boolean), ``cell_clip``
                       and ``proj_clip`` (number or null) and ``forget_bias`` (number)
``library``            ``"mlstm_spec <version>"`` that wrote the file (informative)
``user.<key>``         the caller's own ``metadata`` entries
``checksum``           ``"sha256:<hex>"`` over every tensor and every other metadata entry
=====================  ========================================================================

The checksum is SHA-256 over the ASCII line ``mlstm-spec.weights checksum v1\\n`` followed by, for
each tensor in sorted name order, the fields name, safetensors dtype code (``F32``...), shape as
comma-separated decimals, raw data bytes; then for each metadata key other than ``checksum`` in
sorted order, the fields key, value. Each field is its UTF-8 bytes preceded by their length as an
8-byte little-endian integer. It makes any bit flip in the file an error instead of silently
different weights.

Versions. :func:`save` writes version 1 whenever it can hold the model -- no projection, no peepholes,
run-time options at their defaults -- so such a file holds exactly the tensors and metadata earlier
releases wrote, and they still read it; it writes version 2 only for a model that needs it, and version
3 only for a bidirectional one. :func:`load` reads all three. A reader that knows only version 1 (or
1 and 2) refuses a newer file on its ``format_version`` ("not one this library reads (1); it was
written by a newer mlstm-spec"), never reads it without its variants or as a one-direction stack.

Guarantees (details in ``docs/interop.md``)
-------------------------------------------

``load`` executes nothing from the file (safetensors holds a JSON header and raw numbers, unlike
pickle-based formats such as ``torch.save``). It reads only regular files, refusing FIFOs, devices and
directories before opening them for reading; it parses a header of at most
:data:`MAX_HEADER_BYTES` bytes and :data:`MAX_HEADER_ENTRIES` entries, and compares every count in
the metadata with the tensors present before sizing anything by it, so its time and memory grow with
the file's size, never with numbers written in the file. Every malformed file raises
:class:`WeightFileError` naming the file.

``save`` writes a temporary file next to the destination, flushes it to disk, renames it over the
destination and flushes the directory: a crash or power loss leaves the old file or the new one,
never a mix. A new file gets the permissions ``open()`` would give it (``0o666`` less the umask), an
existing file keeps its mode, and a symbolic link stays a link whose target is replaced.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import re
import secrets
import stat
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .equations import (BIAS_FLAGS, INTEGRATION_MODES, PARAM_SHAPES, PEEPHOLE_WEIGHTS, RUNTIME_DEFAULTS,
                        VARIANT_PARAM_SHAPES)
from .validation import (SPEC_DTYPES, LayerInfo, check_directional_stack, check_integration_mode, check_ndarray,
                         check_runtime_options,
                         check_stack, dtype_name)

__all__ = ["DIRECTIONS", "FORMAT_NAME", "FORMAT_VERSION", "FORMULATION", "FORMULATION_V2", "LAYOUT", "LAYOUT_V2",
           "LAYOUT_V3",
           "MAX_HEADER_BYTES", "MAX_HEADER_ENTRIES", "READ_VERSIONS", "WeightFile", "WeightFileError",
           "checksum", "load", "load_bytes", "read_raw", "save"]

FORMAT_NAME = "mlstm-spec.weights"
#: The newest format version, written for models that use a variant; see "Versions" above.
FORMAT_VERSION = 3
#: The versions :func:`load` reads.
READ_VERSIONS = (1, 2, 3)
FORMULATION = "RecurrentLayers.jl 0.3.4 MultiplicativeLSTMCell (its code): h' = o * tanh(c')"
LAYOUT = ("logical row-major; weight_ih (5H, I) row blocks m,i,o,f,z; weight_hh (H, H) or (H,); "
          "weight_mh (4H, H) row blocks i,o,f,z; bias_ih (5H,); bias_hh (H,); bias_mh (4H,)")
FORMULATION_V2 = FORMULATION + (", with mlstm_spec's optional projection, peepholes, cell_clip, proj_clip "
                                 "and forget_bias (docs/equations.md, Variants)")
LAYOUT_V2 = LAYOUT + "; weight_hr (P, H) with weight_hh (H, P); weight_ci, weight_cf, weight_co (H,)"
LAYOUT_V3 = LAYOUT_V2 + ("; directions 2: layers.{l}.reverse.<name> is layer l's reverse direction (over the "
                         "reversed sequence); layer l > 0 takes both directions' outputs, forward first")
#: The number of directions a file may hold: 1, or 2 for a bidirectional stack (version 3).
DIRECTIONS = (1, 2)
#: Layer options recorded in the ``options`` metadata entry, in this order.
OPTION_NAMES = ("bias", "recurrent_bias", "multiplicative_bias", "independent_recurrence", "integration_mode")
#: What version 2 adds to them: the structural variants, then the run-time options.
VARIANT_OPTION_NAMES = ("proj_size", "peepholes") + tuple(RUNTIME_DEFAULTS)
_VARIANT_DEFAULTS = dict(proj_size=0, peepholes=False, **RUNTIME_DEFAULTS)

#: The longest safetensors header :func:`load` parses, in bytes. A file of this library needs about
#: 100 bytes per tensor plus its metadata: 8 MiB holds thousands of layers and generous metadata.
MAX_HEADER_BYTES = 8 * 1024 * 1024
#: The most entries (tensors plus metadata keys) a header may hold: room for 2,700 layers of six
#: tensors, or thousands of metadata entries, while the parsed header stays within about 16 MiB.
MAX_HEADER_ENTRIES = 16_384
# A valid ``options`` entry is a flat object of at most ten short values (under 300 characters).
_MAX_OPTIONS_CHARS = 1024
# Sizes and versions: ASCII digits only (str.isdecimal() also takes e.g. Arabic-Indic digits), and few
# enough of them that int() is cheap and never hits Python's limit on integer string conversion.
_POSITIVE_INT = re.compile(r"[1-9][0-9]{0,17}")
_UNSIGNED_INT = re.compile(r"[0-9]{1,18}")
# What MAX_HEADER_ENTRIES entries can hold, counted in the header's bytes before it is parsed. Strings:
# a tensor entry has 5 (name, "dtype", code, "shape", "data_offsets"), a metadata entry 2, and
# "__metadata__" 1. Commas outside strings: a tensor entry of rank r has r + 3, plus one between
# entries; a rank up to 8 is allowed (weight files hold ranks 1 and 2).
_MAX_HEADER_STRINGS = 5 * MAX_HEADER_ENTRIES + 1
_MAX_HEADER_COMMAS = 12 * MAX_HEADER_ENTRIES
_JSON_STRING = re.compile(rb'"[^"]*"')

#: safetensors dtype code <-> NumPy dtype name, for the dtypes a weight file may hold.
_CODES = {"F16": "float16", "F32": "float32", "F64": "float64"}
_NAMES = {name: code for code, name in _CODES.items()}
_CHECKSUM_TAG = b"mlstm-spec.weights checksum v1\n"
_LAYOUTS = {1: LAYOUT, 2: LAYOUT_V2, 3: LAYOUT_V3}
_REQUIRED_KEYS = ("format", "format_version", "formulation", "layout", "num_layers", "input_size",
                  "hidden_size", "dtype", "options")


class WeightFileError(ValueError):
    """A weight file is unreadable, corrupt, from an unknown format, or contradicts itself.

    The message starts with the file's path and says what is wrong.
    """


@dataclass(frozen=True)
class WeightFile:
    """What :func:`load` returns.

    Attributes:
        layers: one canonical mapping of NumPy arrays per layer, first layer first (writable copies);
            with two directions, two per layer in ``torch.nn.LSTM``'s order (layer 0 forward, layer 0
            reverse, layer 1 forward, ...), as a bidirectional layer's ``to_canonical()`` gives them.
        options: ``bias``, ``recurrent_bias``, ``multiplicative_bias``, ``independent_recurrence``
            and ``integration_mode``, plus those of ``proj_size``, ``peepholes``, ``cell_clip``,
            ``proj_clip``, ``forget_bias`` that are switched on (version 2), and ``bidirectional=True``
            with two directions: ``MLSTM.from_canonical(layers, **options)`` takes them (a
            unidirectional backend refuses a bidirectional file).
        dtype: the parameters' dtype name.
        input_size, hidden_size, num_layers: the stack's sizes (``num_layers`` counts layers, not
            directions).
        metadata: the caller's own entries given to :func:`save` (without the ``user.`` prefix).
        library: the ``library`` entry of the writer, e.g. ``"mlstm_spec 0.1.0"``.
        directions: 1, or 2 for a bidirectional stack.
    """

    layers: list
    options: dict
    dtype: str
    input_size: int
    hidden_size: int
    num_layers: int
    metadata: dict = field(default_factory=dict)
    library: str = ""
    directions: int = 1

    @property
    def integration_mode(self) -> str:
        return self.options["integration_mode"]

    def to_canonical(self) -> list[dict]:
        """The layers, as a backend layer's ``to_canonical()`` gives them (so :func:`save` takes a
        ``WeightFile`` too, keeping its options)."""
        return list(self.layers)


def _safetensors():
    try:
        import safetensors
        import safetensors.numpy
    except ImportError as exc:  # pragma: no cover - exercised only without the extra
        raise ImportError(
            "mlstm_spec.save/load need the safetensors package: pip install 'mlstm-spec[io]'"
        ) from exc
    return safetensors


def _field(data: bytes) -> bytes:
    return len(data).to_bytes(8, "little") + data


def checksum(tensors: Mapping, metadata: Mapping) -> str:
    """The ``checksum`` entry for ``tensors`` (name -> (dtype code, shape, raw bytes)) and the other
    metadata entries (the ``checksum`` key itself is ignored). See the module docstring."""
    digest = hashlib.sha256(_CHECKSUM_TAG)
    for name in sorted(tensors):
        code, shape, data = tensors[name]
        for part in (name.encode(), code.encode(), ",".join(str(int(d)) for d in shape).encode(), bytes(data)):
            digest.update(_field(part))
    for key in sorted(metadata):
        if key != "checksum":
            digest.update(_field(key.encode()))
            digest.update(_field(str(metadata[key]).encode()))
    return "sha256:" + digest.hexdigest()


def _layer_names(info: LayerInfo) -> list[str]:
    return _tensor_names(dict(info.options, proj_size=info.proj_size, peepholes=info.peepholes))


def _tensor_prefix(layer: int, direction: int) -> str:
    """What the names of a layer's tensors start with: ``layers.{l}.``, ``layers.{l}.reverse.`` for the
    reverse direction of a bidirectional stack."""
    return f"layers.{layer}." + ("reverse." if direction else "")


def _tensor_names(options) -> list[str]:
    """The canonical names a layer with these options holds, in canonical order."""
    names = ["weight_ih", "weight_hh", "weight_mh"]
    names += [name for name, flag in BIAS_FLAGS.items() if options[flag]]
    names += ["weight_hr"] if options.get("proj_size") else []
    return names + (list(PEEPHOLE_WEIGHTS) if options.get("peepholes") else [])


# ---- save: what it accepts ----

_ARRAY_ATTRIBUTES = ("__array__", "__array_interface__", "__dlpack__", "numpy")


def _host_array(value, where: str, widened: bool = False) -> np.ndarray:
    """``value`` as a NumPy array on the host, from NumPy or any framework's array, without importing
    a framework: its ``.numpy()`` (torch's ``force=True`` also detaches and copies from a GPU), then
    ``__array__``, then DLPack."""
    if isinstance(value, np.ndarray):
        check_ndarray(value, where)  # refuses np.matrix
        return value
    if not any(hasattr(value, attribute) for attribute in _ARRAY_ATTRIBUTES):
        raise TypeError(f"{where} must be an array (a numpy.ndarray, or a torch, JAX or TensorFlow "
                        f"tensor or variable), got {type(value).__name__}")
    failures = []
    for route, convert in _HOST_ROUTES:
        try:
            array = convert(value)
        except Exception as exc:  # a foreign method may raise anything; every route is tried
            failures.append(f"{route}: {type(exc).__name__}: {_cut(str(exc))}")
            continue
        if isinstance(array, np.ndarray) and array.dtype != object:
            return _host_array(array, where)
    widen = getattr(value, "float", None)
    if not widened and dtype_name(getattr(value, "dtype", "")) == "bfloat16" and callable(widen):
        # torch's bfloat16 exports to no NumPy type; float32 holds every bfloat16 value exactly.
        return _host_array(widen(), where, widened=True)
    raise TypeError(f"{where}: could not copy this {type(value).__name__} to a NumPy array ("
                    + "; ".join(failures) + ")")


def _numpy_method(value, **kwargs):
    method = getattr(value, "numpy", None)
    if not callable(method):
        raise AttributeError("no numpy() method")
    return method(**kwargs)


_HOST_ROUTES = (
    ("numpy(force=True)", lambda v: _numpy_method(v, force=True)),
    ("numpy()", _numpy_method),
    ("__array__", np.asarray),
    ("__dlpack__", np.from_dlpack),
)


def _carried_options(item) -> dict:
    """The options a layer object carries that its tensors do not show: a backend layer's
    ``integration_mode`` and run-time variants (attributes of the spec's names); all of a loaded
    :class:`WeightFile`'s."""
    if isinstance(item, WeightFile):
        return {name: item.options.get(name, RUNTIME_DEFAULTS.get(name))
                for name in ("integration_mode", *RUNTIME_DEFAULTS)}
    mode = getattr(item, "integration_mode", None)
    carried = {"integration_mode": mode} if isinstance(mode, str) else {}
    return {**carried, **{name: getattr(item, name) for name in RUNTIME_DEFAULTS if hasattr(item, name)}}


def _carried_directions(item) -> int:
    """How many directions a layer object's ``to_canonical()`` interleaves: 2 for a bidirectional
    layer (``bidirectional=True``, as ``torch.nn.LSTM``) or weight file, else 1."""
    if isinstance(item, WeightFile):
        return item.directions
    return 2 if getattr(item, "bidirectional", False) is True else 1


def _gather_stack(layers) -> tuple[list, dict, list]:
    """The mappings ``layers`` stands for, first layer first; for each option the layer objects
    among them carry, the values they give it; and the number of directions of each item of
    ``layers`` (None for a plain mapping, whose directions the caller says)."""
    def expand(item, where):
        to_canonical = getattr(item, "to_canonical", None)
        if isinstance(item, Mapping):
            directions.append(None)
            return [item]
        if callable(to_canonical):
            directions.append(_carried_directions(item))
            for name, value in _carried_options(item).items():
                carried.setdefault(name, []).append(value)
            out = to_canonical()
            return [out] if isinstance(out, Mapping) else list(out)
        raise TypeError(f"{where} must be a canonical mapping or a layer with to_canonical(), "
                        f"got {type(item).__name__}")

    carried: dict = {}
    directions: list = []
    if isinstance(layers, (list, tuple)):
        stack = [m for i, item in enumerate(layers) for m in expand(item, f"layers[{i}]")]
    elif isinstance(layers, Mapping) or callable(getattr(layers, "to_canonical", None)):
        stack = expand(layers, "layers")
    else:
        raise TypeError("layers must be a canonical mapping, a list of them, or a layer with "
                        f"to_canonical(), got {type(layers).__name__}")
    if not stack:
        raise TypeError("layers must be a non-empty list of canonical mappings (one per layer), got "
                        f"{type(layers).__name__} of length 0")
    return stack, carried, directions


def _resolve_directions(given, carried: list) -> int:
    """The file's number of directions: ``given`` (None: not given), checked against the layer objects'.
    A bidirectional layer object must come alone: its mappings interleave the two directions."""
    if given is not None and (isinstance(given, bool) or given not in DIRECTIONS):
        raise ValueError(f"directions must be one of {DIRECTIONS} (2: a bidirectional stack), got {given!r}")
    if 2 in carried and len(carried) > 1:
        raise ValueError("layers mixes a bidirectional layer with other items; save a bidirectional layer on "
                         "its own (or its to_canonical() list with directions=2)")
    known = [d for d in carried if d is not None]
    if given is None:
        return known[0] if known else 1
    if known and known[0] != given:
        raise ValueError(f"directions={given} contradicts the layers, which have {known[0]} "
                         f"direction{'s' if known[0] > 1 else ''}; leave it out to use theirs")
    return given


def _merge_options(given: dict, carried: dict) -> dict:
    """``given`` (``integration_mode`` None: not given) completed with the options the layers carry;
    a given value other than the default must agree with theirs."""
    out = dict(given)
    for name, values in carried.items():
        if name == "integration_mode":
            for value in values:
                check_integration_mode(value)
        if any(value != values[0] for value in values):
            raise ValueError(f"layers mix {name} values {values}; a stack shares one")
        default = None if name == "integration_mode" else RUNTIME_DEFAULTS[name]
        if given[name] == default:
            out[name] = values[0]
        elif given[name] != values[0]:
            raise ValueError(f"{name}={given[name]!r} contradicts the layers' own {name} {values[0]!r}; "
                             "leave it out to use the layers'")
    if out["integration_mode"] is None:
        out["integration_mode"] = "addition"
    check_integration_mode(out["integration_mode"])
    return out


def _numpy_stack(stack: list) -> list:
    """Every value converted to NumPy (keys that are not parameters are left for check_stack)."""
    out = []
    for index, layer in enumerate(stack):
        if not isinstance(layer, Mapping):
            raise TypeError(f"layers[{index}] must be a canonical mapping, got {type(layer).__name__}")
        prefix = "layers" if len(stack) == 1 else f"layers[{index}]"
        out.append({name: _host_array(value, f"{prefix}[{name!r}]")
                    if name in PARAM_SHAPES or name in VARIANT_PARAM_SHAPES else value
                    for name, value in layer.items()})
    return out


def save(path, layers, *, integration_mode: str | None = None, metadata: Mapping | None = None,
         cell_clip=None, proj_clip=None, forget_bias=0.0, directions: int | None = None) -> Path:
    """Write a stack of canonical layers to ``path`` (a safetensors file; see the module docstring).

    Args:
        path: the file to write. It is replaced atomically and durably: the data is written to a
            temporary file in the same directory and flushed to disk, renamed over ``path``, and the
            directory flushed, so a crash or power loss leaves the old file or the new one. A new
            file gets ``0o666`` less the umask (as ``open()``, ``np.save`` and ``torch.save``); an
            existing one keeps its mode. When ``path`` is a symbolic link, its final target is
            replaced and the link kept. A read-only existing file, or one that is not a regular
            file (a directory, a device), is refused.
        layers: what to save: one canonical mapping, a list of them (first layer first), a layer of
            any backend (anything with ``to_canonical()``, e.g. ``model``, or a loaded
            :class:`WeightFile`), or a list of such layers. Values may be NumPy arrays or any
            framework's arrays (torch tensors, also with ``requires_grad`` or on a GPU; JAX arrays;
            TensorFlow tensors and variables). bfloat16 values are stored as float32, which holds
            them exactly. The bias flags and independent recurrence are read from the tensors
            present; a stack must share them and one dtype. A bidirectional layer (e.g.
            ``backends.torch.MLSTM(..., bidirectional=True)``) is saved with both directions.
        integration_mode: ``"addition"`` or ``"multiplicative_integration"``: how the layers combine
            the input and multiplicative projections (not visible in the tensors). ``None`` (the
            default) takes it from the layer objects given, and is ``"addition"`` for plain mappings;
            a value contradicting a layer's own ``integration_mode`` is a ValueError.
        metadata: optional ``str -> str`` entries of your own (e.g. a training step), stored as
            ``user.<key>`` and returned by :func:`load` in ``WeightFile.metadata``.
        cell_clip, proj_clip, forget_bias: the run-time options the model was trained with (see
            :func:`mlstm_spec.forward`); like ``integration_mode`` they are not visible in the
            tensors. A loaded :class:`WeightFile` given as ``layers`` brings its own.
        directions: 2 when ``layers`` is a list of mappings of a bidirectional stack, two per layer in
            ``torch.nn.LSTM``'s order (layer 0 forward, layer 0 reverse, layer 1 forward, ...). ``None``
            (the default) takes it from the layer object given (2 for ``bidirectional=True``), and is 1
            for plain mappings; a value contradicting the layer's is a ValueError.

    Two directions make the file version 3; otherwise a projection or peepholes (read from the
    tensors) or a run-time option away from its default make it version 2, and anything else version
    1, the same content as before the variants existed.

    Returns:
        The path given, as a :class:`pathlib.Path`.

    Raises:
        TypeError: a layer is not a mapping of arrays, or has an unsupported dtype.
        ValueError: shapes or options are inconsistent (message in the form of every backend's), or
            ``path`` is not a regular file.
        OSError: the file cannot be written; nothing is left behind, and ``path`` is unchanged.
    """
    safetensors = _safetensors()
    stack, carried, carried_directions = _gather_stack(layers)
    directions = _resolve_directions(directions, carried_directions)
    given = _merge_options(dict(integration_mode=integration_mode, cell_clip=cell_clip, proj_clip=proj_clip,
                                forget_bias=forget_bias), carried)
    stack = _numpy_stack(stack)
    allowed = SPEC_DTYPES + ("bfloat16",)
    infos = (check_stack(stack, argument="layers", allowed=allowed) if directions == 1
             else check_directional_stack(stack, directions, argument="layers", allowed=allowed))
    user = {} if metadata is None else metadata
    if not isinstance(user, Mapping) or not all(isinstance(k, str) and isinstance(v, str) for k, v in user.items()):
        raise TypeError(f"metadata must be a mapping of str to str, got {metadata!r}")
    first = infos[0]
    dtype = "float32" if first.dtype == "bfloat16" else first.dtype
    runtime = check_runtime_options(first, **{name: given[name] for name in RUNTIME_DEFAULTS})
    options = dict(first.options, integration_mode=given["integration_mode"], proj_size=first.proj_size,
                   peepholes=first.peepholes, **runtime)
    if directions == 2:
        version = 3
    else:
        version = 2 if any(options[name] != _VARIANT_DEFAULTS[name] for name in VARIANT_OPTION_NAMES) else 1
    names = OPTION_NAMES + (VARIANT_OPTION_NAMES if version >= 2 else ())
    header = {
        "format": FORMAT_NAME,
        "format_version": str(version),
        "formulation": FORMULATION if version == 1 else FORMULATION_V2,
        "layout": _LAYOUTS[version],
        "num_layers": str(len(stack) // directions),
        "input_size": str(first.input_size),
        "hidden_size": str(first.hidden_size),
        "dtype": dtype,
        "options": json.dumps({name: options[name] for name in names}),
        "library": f"mlstm_spec {_version()}",
    }
    if directions != 1:
        header["directions"] = str(directions)
    header.update({f"user.{key}": value for key, value in user.items()})
    tensors = {}
    for index, (layer, info) in enumerate(zip(stack, infos)):
        prefix = _tensor_prefix(*divmod(index, directions))
        for name in _layer_names(info):
            tensors[prefix + name] = np.ascontiguousarray(
                layer[name], dtype=np.dtype(dtype).newbyteorder("<"))
    header["checksum"] = checksum(
        {name: (_NAMES[a.dtype.name], a.shape, a.tobytes()) for name, a in tensors.items()}, header
    )
    _write_atomically(path, safetensors.numpy.save(tensors, metadata=header))
    return Path(path)


# ---- save: writing ----

def _write_atomically(path, data: bytes) -> None:
    target = Path(os.path.realpath(path))  # a symbolic link's final target (a dangling one's too)
    if target.is_symlink():
        raise OSError(errno.ELOOP, "too many levels of symbolic links", str(path))
    try:
        existing = os.stat(target)
    except FileNotFoundError:
        existing = None
    if existing is not None:
        if not stat.S_ISREG(existing.st_mode):
            raise ValueError(f"path must be a regular file or a new one, got {str(path)!r}, which is "
                             f"{_file_kind(existing.st_mode)}")
        if not os.access(target, os.W_OK):
            raise PermissionError(errno.EACCES, "the existing file is not writable", str(path))
    temporary, descriptor = _create_temporary(target)
    try:
        try:
            if existing is not None:
                _copy_mode(descriptor, temporary, stat.S_IMODE(existing.st_mode))
            view = memoryview(data)
            while view:
                view = view[os.write(descriptor, view):]
            os.fsync(descriptor)
        finally:
            os.close(descriptor)
        os.replace(temporary, target)
    except BaseException as error:
        try:
            os.unlink(temporary)
        except FileNotFoundError:
            pass
        except OSError as cleanup_error:  # reported with the original error, never instead of it
            if hasattr(error, "add_note"):
                error.add_note(f"(the temporary file {temporary} could not be removed: {cleanup_error})")
        raise
    _fsync_directory(target.parent)


def _create_temporary(target: Path) -> tuple[str, int]:
    """A new file next to ``target``, created with mode 0o666 so that the umask (and a default ACL)
    applies as it does to ``open()``; returns its path and an open descriptor."""
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0) | getattr(os, "O_BINARY", 0)
    for _ in range(100):
        temporary = str(target.parent / f".{target.name}.{secrets.token_hex(4)}.tmp")
        try:
            return temporary, os.open(temporary, flags, 0o666)
        except FileExistsError:
            continue
    raise FileExistsError(errno.EEXIST, "no unused temporary file name", str(target.parent))


def _copy_mode(descriptor: int, temporary: str, mode: int) -> None:
    if hasattr(os, "fchmod"):
        os.fchmod(descriptor, mode)
    else:  # pragma: no cover - Windows
        os.chmod(temporary, mode)


def _fsync_directory(directory: Path) -> None:
    """Flush the directory entry of a rename to disk (POSIX; Windows has no directory handle for it)."""
    if os.name == "nt":  # pragma: no cover
        return
    try:
        descriptor = os.open(directory, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except PermissionError:  # a directory we may write but not read: nothing more can be done
        return
    try:
        os.fsync(descriptor)
    except OSError as error:
        if error.errno not in (errno.EINVAL, errno.ENOTSUP, errno.EOPNOTSUPP):  # file systems without it
            raise
    finally:
        os.close(descriptor)


def _version() -> str:
    from . import __version__

    return __version__


# ---- load: reading the file ----

def _file_kind(mode: int) -> str:
    for test, kind in ((stat.S_ISDIR, "a directory"), (stat.S_ISFIFO, "a FIFO (named pipe)"),
                       (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"),
                       (stat.S_ISSOCK, "a socket"), (stat.S_ISREG, "a regular file")):
        if test(mode):
            return kind
    return "not a regular file"


def _require_regular_file(mode: int, path: str) -> None:
    if not stat.S_ISREG(mode):
        raise WeightFileError(f"{path}: is {_file_kind(mode)}, not a regular file; weight files are "
                              "read only from regular files")


def _show(value, limit: int = 80) -> str:
    """``repr(value)``, cut to about ``limit`` characters: file contents in messages stay short."""
    text = repr(value)
    if len(text) <= limit:
        return text
    if isinstance(value, str):
        return f"{value[:limit]!r}... ({len(value)} characters)"
    return f"{text[:limit]}... ({len(text)} characters)"


def _cut(text: str, limit: int = 200) -> str:
    return text if len(text) <= limit else f"{text[:limit]}... ({len(text)} characters)"


def _unreadable(path, reason: str) -> WeightFileError:
    return WeightFileError(f"{path}: not a readable safetensors file (truncated or corrupt): {reason}")


def _header_length(prefix: bytes, size: int, path) -> int:
    """The header length from the file's first 8 bytes, checked against the bound and the file size."""
    if len(prefix) < 8:
        raise _unreadable(path, f"{size} bytes, fewer than the 8 of the header length")
    length = int.from_bytes(prefix[:8], "little")
    if length > MAX_HEADER_BYTES:
        raise WeightFileError(f"{path}: not a readable safetensors file: its header claims {length} bytes; "
                              f"headers of at most {MAX_HEADER_BYTES} bytes are read")
    if 8 + length > size:
        raise _unreadable(path, f"the header claims {length} bytes, but {size - 8} follow its length")
    return length


def _unique_keys(pairs: list) -> dict:
    out = dict(pairs)
    if len(out) != len(pairs):
        seen = set()
        duplicate = next(key for key, _ in pairs if key in seen or seen.add(key))
        raise ValueError(f"duplicate key {_show(duplicate)}")
    return out


def _is_index(value) -> bool:
    return type(value) is int and 0 <= value < 2**64


def _parse_header(raw: bytes, path) -> tuple[frozenset, dict, int]:
    """Parse a header of at most MAX_HEADER_BYTES: ``(tensor names, __metadata__, data length)``.

    Its strings and the commas between its values are counted before parsing (with escaped
    backslashes and quotes removed, every other quote opens or closes a string), so a header of
    many small entries or long lists is refused before any of them becomes a Python object."""
    unescaped = raw.replace(b"\\\\", b"").replace(b'\\"', b"") if b"\\" in raw else raw
    strings = unescaped.count(b'"') // 2
    if strings > _MAX_HEADER_STRINGS:
        raise WeightFileError(f"{path}: not a readable safetensors file: its header holds {strings} strings, "
                              f"more than {MAX_HEADER_ENTRIES} entries can have")
    commas = _JSON_STRING.sub(b"", unescaped).count(b",")  # a Python object per string: bounded above
    if commas > _MAX_HEADER_COMMAS:
        raise WeightFileError(f"{path}: not a readable safetensors file: its header holds {commas} commas "
                              f"between values, more than {MAX_HEADER_ENTRIES} entries can have")
    try:
        header = json.loads(raw.decode("utf-8"), object_pairs_hook=_unique_keys)
    except (ValueError, RecursionError) as exc:  # UnicodeDecodeError and JSONDecodeError are ValueErrors
        raise _unreadable(path, f"the header is not valid JSON: {_cut(str(exc))}") from None
    if not isinstance(header, dict):
        raise _unreadable(path, f"the header must be a JSON object, got {type(header).__name__}")
    metadata = header.pop("__metadata__", None)
    metadata = {} if metadata is None else metadata
    if not (isinstance(metadata, dict) and all(isinstance(v, str) for v in metadata.values())):
        raise _unreadable(path, "__metadata__ must be an object of strings")
    if len(header) + len(metadata) > MAX_HEADER_ENTRIES:
        raise WeightFileError(f"{path}: not a readable safetensors file: its header holds "
                              f"{len(header) + len(metadata)} entries, more than {MAX_HEADER_ENTRIES}")
    data_length = 0
    for name, entry in header.items():
        offsets = entry.get("data_offsets") if isinstance(entry, dict) else None
        shape = entry.get("shape") if isinstance(entry, dict) else None
        if not (isinstance(entry.get("dtype") if isinstance(entry, dict) else None, str)
                and isinstance(shape, list) and all(_is_index(d) for d in shape)
                and isinstance(offsets, list) and len(offsets) == 2 and all(_is_index(o) for o in offsets)
                and offsets[0] <= offsets[1]):
            raise _unreadable(path, f"tensor {_show(name)} needs a dtype, a shape of non-negative "
                                    "integers and data_offsets [begin, end]")
        data_length = max(data_length, offsets[1])
    return frozenset(header), metadata, data_length  # the entries themselves are the parser's to read


def _check_size(header_length: int, data_length: int, size: int, path) -> None:
    held = size - 8 - header_length
    if data_length != held:
        raise _unreadable(path, f"the header describes {data_length} bytes of tensor data, the file "
                                f"holds {held}")


def _read_file(path) -> tuple[bytes, tuple]:
    """The file's bytes and its parsed header, read with memory and time bounded by its size.

    Only regular files are read: the type is checked before opening (a FIFO would block the open, a
    device may never end) and again on the open descriptor, opened non-blocking, in case the path
    was replaced in between. The header is read and checked first, so a file whose size contradicts
    it is refused without reading its data."""
    name = str(path)
    _require_regular_file(os.stat(path).st_mode, name)
    flags = os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_NOCTTY", 0) | getattr(os, "O_BINARY", 0)
    with open(os.open(path, flags), "rb") as file:
        info = os.fstat(file.fileno())
        _require_regular_file(info.st_mode, name)
        size = info.st_size
        prefix = file.read(8)
        header_length = _header_length(prefix, size, name)
        raw = file.read(header_length)
        if len(raw) != header_length:
            raise WeightFileError(f"{name}: the file changed while it was being read")
        parsed = _parse_header(raw, name)
        _check_size(header_length, parsed[2], size, name)
        file.seek(0)
        data = file.read(size)
        if len(data) != size or file.read(1) or not data.startswith(prefix + raw):
            raise WeightFileError(f"{name}: the file changed while it was being read")
    return data, parsed


def read_raw(path) -> tuple[dict, dict]:
    """Read a safetensors file without interpreting it: ``{name: (dtype code, shape, bytes)}`` and the
    header's ``__metadata__`` (``{}`` when absent). Raises :class:`WeightFileError` for a file that is
    not valid safetensors (truncated, corrupt header, offsets that do not cover the data), with the
    bounds of :func:`load`."""
    _safetensors()
    return _parse_raw(*_read_file(path), path)


def _parse_raw(data: bytes, parsed, path) -> tuple[dict, dict]:
    safetensors = _safetensors()
    if parsed is None:
        header_length = _header_length(data, len(data), path)
        parsed = _parse_header(data[8 : 8 + header_length], path)
        _check_size(header_length, parsed[2], len(data), path)
    names, metadata, _ = parsed
    try:
        entries = safetensors.deserialize(data)
    except Exception as exc:  # SafetensorError, or anything else the parser raises on garbage
        raise _unreadable(path, _cut(str(exc))) from exc
    tensors = {name: (entry["dtype"], tuple(entry["shape"]), bytes(entry["data"])) for name, entry in entries}
    if tensors.keys() != names:  # the two parsers must agree on what the file holds
        raise _unreadable(path, "the safetensors parser read other tensor names than the header lists")
    return tensors, dict(metadata)


# ---- load: interpreting it ----

def _parse_positive_int(path, metadata, key) -> int:
    text = metadata[key]
    if not _POSITIVE_INT.fullmatch(text):
        raise WeightFileError(f"{path}: metadata {key!r} must be a positive integer, got {_show(text)} "
                              "(written in at most 18 ASCII digits)")
    return int(text)


def _parse_options(path, text, version=1) -> dict:
    if len(text) > _MAX_OPTIONS_CHARS:
        raise WeightFileError(f"{path}: metadata 'options' must be a short JSON object (at most "
                              f"{_MAX_OPTIONS_CHARS} characters), got {len(text)} characters: {_show(text)}")
    try:
        options = json.loads(text)
    except (ValueError, RecursionError) as exc:
        raise WeightFileError(
            f"{path}: metadata 'options' is not valid JSON ({_cut(str(exc))}): {_show(text)}"
        ) from None
    names = OPTION_NAMES + (VARIANT_OPTION_NAMES if version >= 2 else ())
    if not isinstance(options, dict) or sorted(options) != sorted(names):
        raise WeightFileError(
            f"{path}: metadata 'options' must be a JSON object with exactly the keys "
            f"{list(names)} (format version {version}), got {_show(text)}"
        )
    for name in OPTION_NAMES[:-1]:
        if not isinstance(options[name], bool):
            raise WeightFileError(f"{path}: option {name} must be true or false, got {_show(options[name])}")
    if options["integration_mode"] not in INTEGRATION_MODES:
        raise WeightFileError(
            f"{path}: option integration_mode must be one of {INTEGRATION_MODES}, "
            f"got {_show(options['integration_mode'])}"
        )
    if version >= 2:
        size = options["proj_size"]
        if isinstance(size, bool) or not isinstance(size, int) or size < 0:
            raise WeightFileError(f"{path}: option proj_size must be an integer >= 0, got {_show(size)}")
        if not isinstance(options["peepholes"], bool):
            raise WeightFileError(f"{path}: option peepholes must be true or false, got {_show(options['peepholes'])}")
        try:
            check_runtime_options(**{name: options[name] for name in RUNTIME_DEFAULTS})
        except (TypeError, ValueError) as exc:
            raise WeightFileError(f"{path}: option {_cut(str(exc))}") from exc
    return {name: options[name] for name in names}


def _parse_directions(path, metadata, version: int) -> int:
    """The ``directions`` entry: required ("2") in version 3, absent (one direction) before it."""
    text = metadata.get("directions")
    if version < 3:
        if text is not None:
            raise WeightFileError(f"{path}: metadata 'directions' ({_show(text)}) needs format_version 3, "
                                  f"but the file says {version}")
        return 1
    if text != "2":
        raise WeightFileError(f"{path}: metadata 'directions' must be \"2\" in format_version 3 (a "
                              f"bidirectional stack), got {_show(text)}")
    return 2


def _names(names: list, limit: int = 12) -> str:
    """Tensor names for a message: the first ``limit`` of them, each cut short, and how many more."""
    shown = "[" + ", ".join(_show(name, 60) for name in names[:limit]) + "]"
    return shown if len(names) <= limit else f"{shown} and {len(names) - limit} more"


def load(path, *, verify_checksum: bool = True) -> WeightFile:
    """Read and validate a weight file written by :func:`save` (or by anyone following its layout).

    Everything is checked before anything is returned: the file must be a regular file holding valid
    safetensors (a truncated or corrupt file is rejected) with a bounded header, carry the
    ``mlstm-spec.weights`` metadata of a known format version, match its checksum, hold exactly the
    tensors its options call for (missing and unexpected names are listed), with the canonical
    shapes, one dtype equal to the recorded one, and options and sizes that agree with the tensors.
    Loading never executes anything from the file, and its time and memory grow with the file's
    size only (see the module docstring for the bounds).

    Args:
        path: the file to read.
        verify_checksum: ``False`` accepts a file without (or with a stale) ``checksum`` entry, e.g.
            one written by another tool; every other check still runs.

    Returns:
        A :class:`WeightFile`; build a model with ``MLSTM.from_canonical(w.layers, **w.options)``.

    Raises:
        WeightFileError (a ``ValueError``): anything wrong with the file, including a path that is not
            a regular file (a directory, FIFO or device); the message starts with the path.
        OSError: the file cannot be opened or read (missing, no permission, an I/O error).
    """
    _safetensors()  # the missing extra is named before the file is touched
    data, parsed = _read_file(path)
    return _load(data, parsed, str(path), verify_checksum)


def load_bytes(data: bytes, *, name: str = "<bytes>", verify_checksum: bool = True) -> WeightFile:
    """:func:`load` for the contents of a file already in memory; ``name`` starts every error message."""
    return _load(bytes(data), None, name, verify_checksum)


def _load(data: bytes, parsed, path, verify_checksum: bool) -> WeightFile:
    tensors, metadata = _parse_raw(data, parsed, path)
    if not metadata:
        raise WeightFileError(
            f"{path}: the safetensors header has no __metadata__, so this is not an {FORMAT_NAME} file"
        )
    if metadata.get("format") != FORMAT_NAME:
        raise WeightFileError(
            f"{path}: metadata 'format' is {_show(metadata.get('format'))}, expected {FORMAT_NAME!r}"
        )
    version = metadata.get("format_version")
    if version not in [str(v) for v in READ_VERSIONS]:
        newer = isinstance(version, str) and _UNSIGNED_INT.fullmatch(version) and int(version) > FORMAT_VERSION
        raise WeightFileError(
            f"{path}: format_version {_show(version)} is not one this library reads "
            f"({', '.join(map(str, READ_VERSIONS))})"
            + ("; it was written by a newer mlstm-spec, upgrade to read it" if newer else "")
        )
    version = int(version)
    missing_keys = [key for key in _REQUIRED_KEYS if key not in metadata]
    if missing_keys:
        raise WeightFileError(f"{path}: metadata is missing {missing_keys}")
    if verify_checksum:
        stored = metadata.get("checksum")
        if stored is None:
            raise WeightFileError(
                f"{path}: metadata has no 'checksum'; pass verify_checksum=False to load a file "
                "written without one"
            )
        actual = checksum(tensors, metadata)
        if stored != actual:
            raise WeightFileError(
                f"{path}: checksum mismatch (stored {_show(stored, 90)}, computed {actual}): the file is "
                "corrupt or was edited after it was written"
            )
    expected_text = dict(formulation=FORMULATION if version == 1 else FORMULATION_V2, layout=_LAYOUTS[version])
    for key, expected in expected_text.items():
        if metadata[key] != expected:
            raise WeightFileError(
                f"{path}: metadata {key!r} is {_show(metadata[key], 200)}, expected {expected!r}")
    dtype = metadata["dtype"]
    if dtype not in _NAMES:
        raise WeightFileError(f"{path}: metadata 'dtype' must be one of {SPEC_DTYPES}, got {_show(dtype)}")
    num_layers = _parse_positive_int(path, metadata, "num_layers")
    input_size = _parse_positive_int(path, metadata, "input_size")
    hidden_size = _parse_positive_int(path, metadata, "hidden_size")
    options = _parse_options(path, metadata["options"], version)
    directions = _parse_directions(path, metadata, version)

    names = _tensor_names(options)
    # Each layer holds at least three tensors: a count beyond what the file holds is refused before
    # anything is sized by it, so the expected names below number at most twice the tensors present.
    if 3 * num_layers * directions > len(tensors):
        raise WeightFileError(
            f"{path}: metadata num_layers={num_layers} needs at least {3 * num_layers * directions} tensors "
            f"(weight_ih, weight_hh and weight_mh per layer and direction), but the file holds {len(tensors)}"
        )
    prefixes = [_tensor_prefix(layer, direction) for layer in range(num_layers) for direction in range(directions)]
    expected_names = {prefix + name for prefix in prefixes for name in names}
    missing = sorted(expected_names - set(tensors))
    unexpected = sorted(set(tensors) - expected_names)
    if missing or unexpected:
        raise WeightFileError(
            f"{path}: for num_layers={num_layers} and options {options} the file must hold "
            f"{_names(sorted(expected_names))}; missing {_names(missing)}, unexpected {_names(unexpected)}"
        )
    wrong_dtype = {name: code for name, (code, _, _) in tensors.items() if _CODES.get(code) != dtype}
    if wrong_dtype:
        shown = "{" + ", ".join(f"{_show(name, 60)}: {_show(code, 20)}"
                                for name, code in sorted(wrong_dtype.items())[:12]) + "}"
        raise WeightFileError(
            f"{path}: every tensor must have the recorded dtype {dtype} ({_NAMES[dtype]}), but "
            f"{shown} differ" + (f" (and {len(wrong_dtype) - 12} more)" if len(wrong_dtype) > 12 else "")
        )
    layers = []
    for prefix in prefixes:
        layer = {}
        for name in (*PARAM_SHAPES, *VARIANT_PARAM_SHAPES):
            key = prefix + name
            if key in tensors:
                _, shape, raw = tensors[key]
                layer[name] = np.frombuffer(raw, dtype=np.dtype(dtype).newbyteorder("<")).astype(dtype).reshape(shape)
        layers.append(layer)
    try:
        infos = (check_stack(layers, argument="layers") if directions == 1
                 else check_directional_stack(layers, directions, argument="layers", allowed=SPEC_DTYPES))
    except (TypeError, ValueError) as exc:
        raise WeightFileError(f"{path}: the tensors do not form a valid stack: {exc}") from exc
    found = infos[0].options
    if found["independent_recurrence"] != options["independent_recurrence"]:
        raise WeightFileError(
            f"{path}: option independent_recurrence={options['independent_recurrence']} contradicts "
            f"layers.0.weight_hh of shape {layers[0]['weight_hh'].shape}"
        )
    if version >= 2:
        if infos[0].proj_size != options["proj_size"]:
            raise WeightFileError(
                f"{path}: option proj_size={options['proj_size']} contradicts layers.0.weight_hr of shape "
                f"{layers[0]['weight_hr'].shape}"
            )
        try:
            check_runtime_options(infos[0], **{name: options[name] for name in RUNTIME_DEFAULTS})
        except ValueError as exc:
            raise WeightFileError(f"{path}: option {_cut(str(exc))}") from exc
        options = {name: value for name, value in options.items()
                   if name in OPTION_NAMES or value != _VARIANT_DEFAULTS[name]}
    if directions == 2:
        options["bidirectional"] = True
    for key, value, actual in (("input_size", input_size, infos[0].input_size),
                               ("hidden_size", hidden_size, infos[0].hidden_size)):
        if value != actual:
            raise WeightFileError(
                f"{path}: metadata {key}={value} contradicts the tensors, which have {key}={actual} "
                f"(layers.0.weight_ih has shape {layers[0]['weight_ih'].shape})"
            )
    user = {key[len("user."):]: value for key, value in metadata.items() if key.startswith("user.")}
    return WeightFile(layers=layers, options=options, dtype=dtype, input_size=input_size,
                      hidden_size=hidden_size, num_layers=num_layers, metadata=user,
                      library=metadata.get("library", ""), directions=directions)
