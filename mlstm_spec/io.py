"""One weight file for every implementation: a stack of canonical layers in a safetensors file.

``save(path, layers, integration_mode=...)`` writes, ``load(path)`` reads and validates. Every backend
moves its weights through it with ``to_canonical`` / ``from_canonical``; RecurrentLayers.jl reads the
same file with SafeTensors.jl (see ``docs/interop.md``).

File layout (format ``mlstm-spec.weights``, versions 1 and 2)
--------------------------------------------------------------

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
All tensors share one dtype: float16, float32 or float64 (bfloat16 models: save as float32, which
holds every bfloat16 value exactly).

The header's ``__metadata__`` (string to string) holds:

=====================  ========================================================================
key                    value
=====================  ========================================================================
``format``             ``"mlstm-spec.weights"``
``format_version``     ``"1"``, or ``"2"`` for a model that uses a variant
``formulation``        :data:`FORMULATION` (version 2: :data:`FORMULATION_V2`), the equations
``layout``             :data:`LAYOUT` (version 2: :data:`LAYOUT_V2`), orientation and blocks
``num_layers``         decimal, e.g. ``"2"``
``input_size``         decimal, ``I`` of layer 0
``hidden_size``        decimal, ``H``
``dtype``              ``"float16"``, ``"float32"`` or ``"float64"``
``options``            JSON object: ``bias``, ``recurrent_bias``, ``multiplicative_bias``,
                       ``independent_recurrence`` (booleans) and ``integration_mode``; version 2
                       also ``proj_size`` (int, 0: none), ``peepholes`` (boolean), ``cell_clip``
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
releases wrote, and they still read it; it writes version 2 only for a model that needs it. :func:`load` reads both. A
reader that knows only version 1 refuses a version-2 file on its ``format_version`` ("not one this
library reads (1); it was written by a newer mlstm-spec"), never reads it without its variants.

Safety: safetensors holds only a JSON header and raw numbers. Loading never executes code from the
file (unlike pickle-based formats such as ``torch.save``), and every field is validated before use.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .equations import BIAS_FLAGS, INTEGRATION_MODES, PARAM_SHAPES, PEEPHOLE_WEIGHTS, RUNTIME_DEFAULTS, VARIANT_PARAM_SHAPES
from .validation import SPEC_DTYPES, LayerInfo, check_integration_mode, check_runtime_options, check_stack, dtype_name

__all__ = ["FORMAT_NAME", "FORMAT_VERSION", "FORMULATION", "FORMULATION_V2", "LAYOUT", "LAYOUT_V2",
           "READ_VERSIONS", "WeightFile", "WeightFileError",
           "checksum", "load", "load_bytes", "read_raw", "save"]

FORMAT_NAME = "mlstm-spec.weights"
#: The newest format version, written for models that use a variant; see "Versions" above.
FORMAT_VERSION = 2
#: The versions :func:`load` reads.
READ_VERSIONS = (1, 2)
FORMULATION = "RecurrentLayers.jl 0.3.4 MultiplicativeLSTMCell (its code): h' = o * tanh(c')"
LAYOUT = ("logical row-major; weight_ih (5H, I) row blocks m,i,o,f,z; weight_hh (H, H) or (H,); "
          "weight_mh (4H, H) row blocks i,o,f,z; bias_ih (5H,); bias_hh (H,); bias_mh (4H,)")
FORMULATION_V2 = FORMULATION + (", with mlstm_spec's optional projection, peepholes, cell_clip, proj_clip "
                                 "and forget_bias (docs/equations.md, Variants)")
LAYOUT_V2 = LAYOUT + "; weight_hr (P, H) with weight_hh (H, P); weight_ci, weight_cf, weight_co (H,)"
#: Layer options recorded in the ``options`` metadata entry, in this order.
OPTION_NAMES = ("bias", "recurrent_bias", "multiplicative_bias", "independent_recurrence", "integration_mode")
#: What version 2 adds to them: the structural variants, then the run-time options.
VARIANT_OPTION_NAMES = ("proj_size", "peepholes") + tuple(RUNTIME_DEFAULTS)
_VARIANT_DEFAULTS = dict(proj_size=0, peepholes=False, **RUNTIME_DEFAULTS)

#: safetensors dtype code <-> NumPy dtype name, for the dtypes a weight file may hold.
_CODES = {"F16": "float16", "F32": "float32", "F64": "float64"}
_NAMES = {name: code for code, name in _CODES.items()}
_CHECKSUM_TAG = b"mlstm-spec.weights checksum v1\n"
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
        layers: one canonical mapping of NumPy arrays per layer, first layer first (writable copies).
        options: ``bias``, ``recurrent_bias``, ``multiplicative_bias``, ``independent_recurrence``
            and ``integration_mode``, plus those of ``proj_size``, ``peepholes``, ``cell_clip``,
            ``proj_clip``, ``forget_bias`` that are switched on (version 2): every backend's
            ``MLSTM.from_canonical(layers, **options)`` takes them.
        dtype: the parameters' dtype name.
        input_size, hidden_size, num_layers: the stack's sizes.
        metadata: the caller's own entries given to :func:`save` (without the ``user.`` prefix).
        library: the ``library`` entry of the writer, e.g. ``"mlstm_spec 0.1.0"``.
    """

    layers: list
    options: dict
    dtype: str
    input_size: int
    hidden_size: int
    num_layers: int
    metadata: dict = field(default_factory=dict)
    library: str = ""

    @property
    def integration_mode(self) -> str:
        return self.options["integration_mode"]


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


def _tensor_names(options) -> list[str]:
    """The canonical names a layer with these options holds, in canonical order."""
    names = ["weight_ih", "weight_hh", "weight_mh"]
    names += [name for name, flag in BIAS_FLAGS.items() if options[flag]]
    names += ["weight_hr"] if options.get("proj_size") else []
    return names + (list(PEEPHOLE_WEIGHTS) if options.get("peepholes") else [])


def save(path, layers, *, integration_mode: str = "addition", metadata: Mapping | None = None,
         cell_clip=None, proj_clip=None, forget_bias=0.0) -> Path:
    """Write a stack of canonical layers to ``path`` (a safetensors file; see the module docstring).

    Args:
        path: the file to write (replaced atomically: a crash never leaves a half-written file).
        layers: one canonical mapping of NumPy arrays, or a list of them (first layer first), e.g.
            ``model.to_canonical()`` of any backend. The bias flags and independent recurrence are
            read from the tensors present; a stack must share them and one dtype.
        integration_mode: ``"addition"`` or ``"multiplicative_integration"``: how the layers were
            trained to combine the input and multiplicative projections (not visible in the tensors).
        metadata: optional ``str -> str`` entries of your own (e.g. a training step), stored as
            ``user.<key>`` and returned by :func:`load` in ``WeightFile.metadata``.
        cell_clip, proj_clip, forget_bias: the run-time options the model was trained with (see
            :func:`mlstm_spec.forward`); like ``integration_mode`` they are not visible in the tensors.

    A projection or peepholes (read from the tensors) or a run-time option away from its default make
    the file version 2; otherwise it is version 1, the same content as before the variants existed.

    Returns:
        The path written, as a :class:`pathlib.Path`.

    Raises:
        TypeError: a layer is not a mapping of NumPy arrays, or has an unsupported dtype.
        ValueError: shapes or options are inconsistent (message in the form of every backend's).
    """
    safetensors = _safetensors()
    check_integration_mode(integration_mode)
    stack = [layers] if isinstance(layers, Mapping) else layers
    if isinstance(stack, (list, tuple)):
        for i, layer in enumerate(stack):
            if isinstance(layer, Mapping):
                for name, value in layer.items():
                    if getattr(value, "dtype", None) is not None and dtype_name(value.dtype) == "bfloat16":
                        raise TypeError(
                            f"layers[{i}][{name!r}] is bfloat16, which weight files do not hold; save "
                            "float32 (exact for every bfloat16 value) and convert back after load"
                        )
    infos = check_stack(stack, argument="layers")
    user = {} if metadata is None else metadata
    if not isinstance(user, Mapping) or not all(isinstance(k, str) and isinstance(v, str) for k, v in user.items()):
        raise TypeError(f"metadata must be a mapping of str to str, got {metadata!r}")
    first = infos[0]
    runtime = check_runtime_options(first, cell_clip=cell_clip, proj_clip=proj_clip, forget_bias=forget_bias)
    options = dict(first.options, integration_mode=integration_mode, proj_size=first.proj_size,
                   peepholes=first.peepholes, **runtime)
    version = 2 if any(options[name] != _VARIANT_DEFAULTS[name] for name in VARIANT_OPTION_NAMES) else 1
    names = OPTION_NAMES + (VARIANT_OPTION_NAMES if version == 2 else ())
    header = {
        "format": FORMAT_NAME,
        "format_version": str(version),
        "formulation": FORMULATION if version == 1 else FORMULATION_V2,
        "layout": LAYOUT if version == 1 else LAYOUT_V2,
        "num_layers": str(len(stack)),
        "input_size": str(first.input_size),
        "hidden_size": str(first.hidden_size),
        "dtype": first.dtype,
        "options": json.dumps({name: options[name] for name in names}),
        "library": f"mlstm_spec {_version()}",
    }
    header.update({f"user.{key}": value for key, value in user.items()})
    tensors = {}
    for index, (layer, info) in enumerate(zip(stack, infos)):
        for name in _layer_names(info):
            value = layer[name]
            tensors[f"layers.{index}.{name}"] = np.ascontiguousarray(value, dtype=value.dtype.newbyteorder("<"))
    header["checksum"] = checksum(
        {name: (_NAMES[a.dtype.name], a.shape, a.tobytes()) for name, a in tensors.items()}, header
    )
    data = safetensors.numpy.save(tensors, metadata=header)
    path = Path(path)
    handle, temporary = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent or ".")
    try:
        with os.fdopen(handle, "wb") as out:
            out.write(data)
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise
    return path


def _version() -> str:
    from . import __version__

    return __version__


def read_raw(path) -> tuple[dict, dict]:
    """Read a safetensors file without interpreting it: ``{name: (dtype code, shape, bytes)}`` and the
    header's ``__metadata__`` (``{}`` when absent). Raises :class:`WeightFileError` for a file that is
    not valid safetensors (truncated, corrupt header, offsets that do not cover the data)."""
    return _parse_raw(Path(path).read_bytes(), path)


def _parse_raw(data: bytes, path) -> tuple[dict, dict]:
    safetensors = _safetensors()
    try:
        entries = safetensors.deserialize(data)
    except Exception as exc:  # SafetensorError, or anything else the parser raises on garbage
        raise WeightFileError(
            f"{path}: not a readable safetensors file (truncated or corrupt): {exc}"
        ) from exc
    # The parser accepted the header, so its length and JSON are sound; read __metadata__ from it.
    header_length = int.from_bytes(data[:8], "little")
    try:
        header = json.loads(data[8 : 8 + header_length])
    except ValueError as exc:  # pragma: no cover - the parser has already validated the JSON
        raise WeightFileError(f"{path}: corrupt safetensors header: {exc}") from exc
    metadata = header.get("__metadata__") or {}
    tensors = {name: (entry["dtype"], tuple(entry["shape"]), bytes(entry["data"])) for name, entry in entries}
    return tensors, dict(metadata)


def _parse_positive_int(path, metadata, key) -> int:
    text = metadata[key]
    if not (isinstance(text, str) and text.isdecimal() and int(text) >= 1):
        raise WeightFileError(f"{path}: metadata {key!r} must be a positive integer, got {text!r}")
    return int(text)


def _parse_options(path, text, version=1) -> dict:
    try:
        options = json.loads(text)
    except ValueError as exc:
        raise WeightFileError(f"{path}: metadata 'options' is not valid JSON ({exc}): {text!r}") from exc
    names = OPTION_NAMES + (VARIANT_OPTION_NAMES if version == 2 else ())
    if not isinstance(options, dict) or sorted(options) != sorted(names):
        raise WeightFileError(
            f"{path}: metadata 'options' must be a JSON object with exactly the keys "
            f"{list(names)} (format version {version}), got {text!r}"
        )
    for name in OPTION_NAMES[:-1]:
        if not isinstance(options[name], bool):
            raise WeightFileError(f"{path}: option {name} must be true or false, got {options[name]!r}")
    if options["integration_mode"] not in INTEGRATION_MODES:
        raise WeightFileError(
            f"{path}: option integration_mode must be one of {INTEGRATION_MODES}, "
            f"got {options['integration_mode']!r}"
        )
    if version == 2:
        size = options["proj_size"]
        if isinstance(size, bool) or not isinstance(size, int) or size < 0:
            raise WeightFileError(f"{path}: option proj_size must be an integer >= 0, got {size!r}")
        if not isinstance(options["peepholes"], bool):
            raise WeightFileError(f"{path}: option peepholes must be true or false, got {options['peepholes']!r}")
        try:
            check_runtime_options(**{name: options[name] for name in RUNTIME_DEFAULTS})
        except (TypeError, ValueError) as exc:
            raise WeightFileError(f"{path}: option {exc}") from exc
    return {name: options[name] for name in names}


def load(path, *, verify_checksum: bool = True) -> WeightFile:
    """Read and validate a weight file written by :func:`save` (or by anyone following its layout).

    Everything is checked before anything is returned: the file must be valid safetensors (a
    truncated or corrupt file is rejected), carry the ``mlstm-spec.weights`` metadata of a known
    format version, match its checksum, hold exactly the tensors its options call for (missing and
    unexpected names are listed), with the canonical shapes, one dtype equal to the recorded one,
    and options and sizes that agree with the tensors. The file's code-free format means loading
    never executes anything from it.

    Args:
        path: the file to read.
        verify_checksum: ``False`` accepts a file without (or with a stale) ``checksum`` entry, e.g.
            one written by another tool; every other check still runs.

    Returns:
        A :class:`WeightFile`; build a model with ``MLSTM.from_canonical(w.layers, **w.options)``.

    Raises:
        WeightFileError (a ``ValueError``): anything wrong with the file; the message names the path.
        OSError: the file cannot be read at all (missing, a directory, no permission).
    """
    _safetensors()  # the missing extra is named before the file is touched
    return load_bytes(Path(path).read_bytes(), name=str(path), verify_checksum=verify_checksum)


def load_bytes(data: bytes, *, name: str = "<bytes>", verify_checksum: bool = True) -> WeightFile:
    """:func:`load` for the contents of a file already in memory; ``name`` starts every error message."""
    path = name
    tensors, metadata = _parse_raw(bytes(data), path)
    if not metadata:
        raise WeightFileError(
            f"{path}: the safetensors header has no __metadata__, so this is not an {FORMAT_NAME} file"
        )
    if metadata.get("format") != FORMAT_NAME:
        raise WeightFileError(
            f"{path}: metadata 'format' is {metadata.get('format')!r}, expected {FORMAT_NAME!r}"
        )
    version = metadata.get("format_version")
    if version not in [str(v) for v in READ_VERSIONS]:
        newer = isinstance(version, str) and version.isdecimal() and int(version) > FORMAT_VERSION
        raise WeightFileError(
            f"{path}: format_version {version!r} is not one this library reads "
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
                f"{path}: checksum mismatch (stored {stored}, computed {actual}): the file is "
                "corrupt or was edited after it was written"
            )
    expected_text = dict(formulation=FORMULATION, layout=LAYOUT) if version == 1 else dict(
        formulation=FORMULATION_V2, layout=LAYOUT_V2)
    for key, expected in expected_text.items():
        if metadata[key] != expected:
            raise WeightFileError(f"{path}: metadata {key!r} is {metadata[key]!r}, expected {expected!r}")
    dtype = metadata["dtype"]
    if dtype not in _NAMES:
        raise WeightFileError(f"{path}: metadata 'dtype' must be one of {SPEC_DTYPES}, got {dtype!r}")
    num_layers = _parse_positive_int(path, metadata, "num_layers")
    input_size = _parse_positive_int(path, metadata, "input_size")
    hidden_size = _parse_positive_int(path, metadata, "hidden_size")
    options = _parse_options(path, metadata["options"], version)

    names = _tensor_names(options)
    expected_names = {f"layers.{index}.{name}" for index in range(num_layers) for name in names}
    missing = sorted(expected_names - set(tensors))
    unexpected = sorted(set(tensors) - expected_names)
    if missing or unexpected:
        raise WeightFileError(
            f"{path}: for num_layers={num_layers} and options {options} the file must hold "
            f"{sorted(expected_names)}; missing {missing}, unexpected {unexpected}"
        )
    wrong_dtype = {name: code for name, (code, _, _) in tensors.items() if _CODES.get(code) != dtype}
    if wrong_dtype:
        raise WeightFileError(
            f"{path}: every tensor must have the recorded dtype {dtype} ({_NAMES[dtype]}), but "
            f"{dict(sorted(wrong_dtype.items()))} differ"
        )
    layers = []
    for index in range(num_layers):
        layer = {}
        for name in (*PARAM_SHAPES, *VARIANT_PARAM_SHAPES):
            key = f"layers.{index}.{name}"
            if key in tensors:
                _, shape, raw = tensors[key]
                layer[name] = np.frombuffer(raw, dtype=np.dtype(dtype).newbyteorder("<")).astype(dtype).reshape(shape)
        layers.append(layer)
    try:
        infos = check_stack(layers, argument="layers")
    except (TypeError, ValueError) as exc:
        raise WeightFileError(f"{path}: the tensors do not form a valid stack: {exc}") from exc
    found = infos[0].options
    if found["independent_recurrence"] != options["independent_recurrence"]:
        raise WeightFileError(
            f"{path}: option independent_recurrence={options['independent_recurrence']} contradicts "
            f"layers.0.weight_hh of shape {layers[0]['weight_hh'].shape}"
        )
    if version == 2:
        if infos[0].proj_size != options["proj_size"]:
            raise WeightFileError(
                f"{path}: option proj_size={options['proj_size']} contradicts layers.0.weight_hr of shape "
                f"{layers[0]['weight_hr'].shape}"
            )
        try:
            check_runtime_options(infos[0], **{name: options[name] for name in RUNTIME_DEFAULTS})
        except ValueError as exc:
            raise WeightFileError(f"{path}: option {exc}") from exc
        options = {name: value for name, value in options.items()
                   if name in OPTION_NAMES or value != _VARIANT_DEFAULTS[name]}
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
                      library=metadata.get("library", ""))
