"""``mlstm_spec.save`` / ``load``: lossless round trips, and every kind of bad file rejected clearly.

Corrupt files are made three ways: truncated at every length, one bit flipped at every position, and
hand-edited (rewritten with safetensors directly, so the edit is a valid safetensors file whose content
contradicts itself; the checksum is recomputed where the test targets a later check).
"""

from __future__ import annotations

import json
import re
import os
import pickle
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import mlstm_spec
from mlstm_spec import io as weight_io

safetensors_numpy = pytest.importorskip("safetensors.numpy")

FLAGS = ("bias", "recurrent_bias", "multiplicative_bias", "independent_recurrence")


def make_stack(num_layers=2, input_size=3, hidden_size=4, dtype=np.float32, seed=0, special=True, **flags):
    rng = np.random.default_rng(seed)
    layers = []
    for layer in range(num_layers):
        params = mlstm_spec.init_params(input_size if layer == 0 else hidden_size, hidden_size, rng=rng,
                                        dtype=dtype, **flags)
        params = {k: (v + rng.uniform(-1, 1, v.shape)).astype(dtype) for k, v in params.items()}  # nonzero biases
        layers.append(params)
    if special:  # bit patterns a lossy path would change: -0.0, a subnormal, the extremes
        finfo = np.finfo(dtype)
        layers[0]["weight_ih"].flat[:4] = [-0.0, finfo.smallest_subnormal, finfo.max, finfo.tiny]
    return layers


def assert_bit_identical(got, want):
    assert len(got) == len(want)
    for g, w in zip(got, want):
        assert sorted(g) == sorted(w)
        for name in w:
            assert g[name].dtype == w[name].dtype, name
            assert g[name].shape == w[name].shape, name
            assert g[name].tobytes() == w[name].tobytes(), name


def read(path):
    """Tensors and metadata of a safetensors file, read with safetensors itself."""
    tensors, metadata = weight_io.read_raw(path)
    arrays = {name: np.frombuffer(raw, dtype={"F16": "<f2", "F32": "<f4", "F64": "<f8"}[code]).reshape(shape)
              for name, (code, shape, raw) in tensors.items()}
    return arrays, metadata


def rewrite(path, *, tensors=None, metadata=None, fix_checksum=True):
    """Rewrite ``path`` with edited tensors/metadata (callables taking and returning a dict)."""
    arrays, meta = read(path)
    arrays = tensors(dict(arrays)) if tensors else arrays
    meta = metadata(dict(meta)) if metadata else meta
    if fix_checksum:
        meta["checksum"] = weight_io.checksum(
            {n: ({"float16": "F16", "float32": "F32", "float64": "F64"}.get(a.dtype.name, "I32"), a.shape, a.tobytes())
             for n, a in arrays.items()}, meta)
    Path(path).write_bytes(safetensors_numpy.save({n: np.ascontiguousarray(a) for n, a in arrays.items()},
                                                  metadata=meta or None))


@pytest.fixture
def saved(tmp_path):
    path = tmp_path / "model.safetensors"
    layers = make_stack()
    mlstm_spec.save(path, layers)
    return path, layers


# ---- round trips ----

@pytest.mark.parametrize("dtype", [np.float16, np.float32, np.float64])
@pytest.mark.parametrize("flags", [dict(zip(FLAGS, bits)) for bits in np.ndindex(2, 2, 2, 2)],
                         ids=lambda f: "".join(str(int(v)) for v in f.values()))
def test_round_trip_is_bit_identical_for_every_option_and_dtype(tmp_path, dtype, flags):
    flags = {k: bool(v) for k, v in flags.items()}
    layers = make_stack(dtype=dtype, **flags)
    path = tmp_path / "w.safetensors"
    mlstm_spec.save(path, layers, integration_mode="multiplicative_integration")
    loaded = mlstm_spec.load(path)
    assert_bit_identical(loaded.layers, layers)
    assert loaded.options == dict(flags, integration_mode="multiplicative_integration")
    assert loaded.integration_mode == "multiplicative_integration"
    assert (loaded.dtype, loaded.num_layers, loaded.input_size, loaded.hidden_size) == (
        np.dtype(dtype).name, 2, 3, 4)


def test_one_mapping_is_saved_as_a_one_layer_stack(tmp_path):
    (layer,) = make_stack(num_layers=1)
    mlstm_spec.save(tmp_path / "w.safetensors", layer)
    loaded = mlstm_spec.load(tmp_path / "w.safetensors")
    assert_bit_identical(loaded.layers, [layer])
    assert loaded.num_layers == 1


def test_loaded_model_computes_what_the_saved_one_did(tmp_path):
    path, layers = tmp_path / "w.safetensors", make_stack(special=False)
    mlstm_spec.save(path, layers)
    loaded = mlstm_spec.load(path)
    xs = np.random.default_rng(1).standard_normal((2, 5, 3)).astype(np.float32)
    for a, b in zip(layers, loaded.layers):
        hs_a, _ = mlstm_spec.forward(a, xs)
        hs_b, _ = mlstm_spec.forward(b, xs)
        assert hs_a.tobytes() == hs_b.tobytes()
        xs = hs_a


def test_user_metadata_and_writer_are_returned(tmp_path):
    path = tmp_path / "w.safetensors"
    mlstm_spec.save(path, make_stack(), metadata={"step": "1200", "corpus": "tinyshakespeare"})
    loaded = mlstm_spec.load(path)
    assert loaded.metadata == {"step": "1200", "corpus": "tinyshakespeare"}
    assert loaded.library == f"mlstm_spec {mlstm_spec.__version__}"


def test_loaded_arrays_are_writable_copies(saved):
    path, _ = saved
    loaded = mlstm_spec.load(path)
    loaded.layers[0]["weight_ih"][0, 0] = 42.0  # would raise on a read-only view of the file's buffer
    assert mlstm_spec.load(path).layers[0]["weight_ih"][0, 0] != 42.0


def test_file_layout_names_shapes_and_metadata(saved):
    """The layout documented in mlstm_spec.io, read back with safetensors alone."""
    path, layers = saved
    arrays, meta = read(path)
    expected = {f"layers.{k}.{name}": layers[k][name] for k in range(2) for name in layers[k]}
    assert sorted(arrays) == sorted(expected)
    for name, value in expected.items():
        assert arrays[name].shape == value.shape and arrays[name].dtype == value.dtype
    assert arrays["layers.0.weight_ih"].shape == (20, 3) and arrays["layers.1.weight_ih"].shape == (20, 4)
    assert meta["format"] == "mlstm-spec.weights" and meta["format_version"] == "1"
    assert (meta["num_layers"], meta["input_size"], meta["hidden_size"], meta["dtype"]) == ("2", "3", "4", "float32")
    assert json.loads(meta["options"]) == dict(bias=True, recurrent_bias=True, multiplicative_bias=True,
                                               independent_recurrence=False, integration_mode="addition")
    assert "RecurrentLayers.jl" in meta["formulation"] and "m,i,o,f,z" in meta["layout"]
    assert meta["checksum"].startswith("sha256:") and len(meta["checksum"]) == 7 + 64


def test_save_replaces_an_existing_file_and_leaves_no_temporary(tmp_path):
    path = tmp_path / "w.safetensors"
    mlstm_spec.save(path, make_stack(seed=1))
    second = make_stack(seed=2)
    mlstm_spec.save(path, second)
    assert_bit_identical(mlstm_spec.load(path).layers, second)
    assert os.listdir(tmp_path) == ["w.safetensors"]


# ---- what save refuses ----

def test_save_rejects_inconsistent_or_foreign_input(tmp_path):
    path = tmp_path / "w.safetensors"
    a, = make_stack(num_layers=1, special=False)
    b, = make_stack(num_layers=1, input_size=4, recurrent_bias=False)
    with pytest.raises(ValueError, match=r"layers\[1\] has options .* a stack shares one set"):
        mlstm_spec.save(path, [a, b])
    with pytest.raises(ValueError, match=r"layers\[1\] must take input_size = hidden_size of layer 0"):
        mlstm_spec.save(path, [a, a])
    with pytest.raises(TypeError, match=r"layers\['weight_ih'\] must be a numpy.ndarray, got list"):
        mlstm_spec.save(path, dict(a, weight_ih=a["weight_ih"].tolist()))
    with pytest.raises(ValueError, match="integration_mode must be one of"):
        mlstm_spec.save(path, a, integration_mode="mult")
    with pytest.raises(TypeError, match="metadata must be a mapping of str to str"):
        mlstm_spec.save(path, a, metadata={"step": 3})
    with pytest.raises(TypeError, match=r"dtype in \('float16', 'float32', 'float64'\), got int32"):
        mlstm_spec.save(path, {k: v.astype(np.int32) for k, v in a.items()})
    with pytest.raises(TypeError, match="non-empty list"):
        mlstm_spec.save(path, [])
    assert not path.exists()


def test_save_refuses_bfloat16_with_advice(tmp_path):
    ml_dtypes = pytest.importorskip("ml_dtypes")
    a, = make_stack(num_layers=1)
    with pytest.raises(TypeError, match="bfloat16.*save float32"):
        mlstm_spec.save(tmp_path / "w.safetensors", {k: v.astype(ml_dtypes.bfloat16) for k, v in a.items()})


# ---- truncated and bit-flipped files ----

def test_a_truncated_file_is_rejected(saved, tmp_path):
    path, _ = saved
    broken = tmp_path / "broken.safetensors"
    broken.write_bytes(path.read_bytes()[:-1])
    with pytest.raises(mlstm_spec.WeightFileError, match=r"broken.safetensors: not a readable safetensors file"):
        mlstm_spec.load(broken)


def test_every_truncation_is_rejected(saved):
    # load() is read_bytes() + load_bytes(); going through memory keeps this exhaustive test fast
    path, _ = saved
    data = path.read_bytes()
    for length in range(len(data)):
        with pytest.raises(mlstm_spec.WeightFileError, match=r"^cut: not a readable safetensors file"):
            weight_io.load_bytes(data[:length], name="cut")


def test_appended_bytes_are_rejected(saved, tmp_path):
    path, _ = saved
    broken = tmp_path / "broken.safetensors"
    broken.write_bytes(path.read_bytes() + b"\0")
    with pytest.raises(mlstm_spec.WeightFileError, match="truncated or corrupt"):
        mlstm_spec.load(broken)


def test_every_single_bit_flip_is_rejected(tmp_path):
    """One bit flipped anywhere -- length prefix, JSON header, padding, tensor data -- is an error."""
    path = tmp_path / "w.safetensors"
    mlstm_spec.save(path, make_stack(num_layers=1, hidden_size=2, input_size=2))
    data = bytearray(path.read_bytes())
    header_end = 8 + int.from_bytes(data[:8], "little")
    kinds = set()
    for position in range(len(data)):
        for bit in range(8):
            flipped = bytearray(data)
            flipped[position] ^= 1 << bit
            with pytest.raises(mlstm_spec.WeightFileError) as caught:
                weight_io.load_bytes(flipped, name=f"byte {position} bit {bit}")
            kinds.add("checksum" if "checksum" in str(caught.value) else "other")
    assert header_end < len(data)
    assert kinds == {"checksum", "other"}  # data flips caught by the checksum, header flips by parsing


def test_a_flipped_data_bit_is_named_as_a_checksum_mismatch(saved, tmp_path):
    path, _ = saved
    data = bytearray(path.read_bytes())
    data[-1] ^= 0x01  # the last byte of the last tensor's data
    broken = tmp_path / "broken.safetensors"
    broken.write_bytes(data)
    with pytest.raises(mlstm_spec.WeightFileError, match="checksum mismatch .* corrupt or was edited"):
        mlstm_spec.load(broken)


def test_a_pickle_is_rejected_without_running_it(tmp_path):
    marker = tmp_path / "executed"

    class Payload:
        def __reduce__(self):
            return (Path.touch, (marker,))

    path = tmp_path / "model.safetensors"
    path.write_bytes(pickle.dumps(Payload()))
    with pytest.raises(mlstm_spec.WeightFileError, match="not a readable safetensors file"):
        mlstm_spec.load(path)
    assert not marker.exists()


def test_missing_file_is_an_os_error(tmp_path):
    with pytest.raises(FileNotFoundError):
        mlstm_spec.load(tmp_path / "nope.safetensors")


# ---- hand-edited files ----

def edit_options(**changes):
    def edit(meta):
        options = json.loads(meta["options"])
        options.update(changes)
        meta["options"] = json.dumps(options)
        return meta
    return edit


def edit_meta(**changes):
    def edit(meta):
        for key, value in changes.items():
            if value is None:
                meta.pop(key, None)
            else:
                meta[key] = value
        return meta
    return edit


def drop(*names):
    return lambda arrays: {k: v for k, v in arrays.items() if k not in names}


def add(**new):
    return lambda arrays: {**arrays, **{k.replace("__", "."): v for k, v in new.items()}}


HAND_EDITS = {
    "option contradicts a present bias": (
        dict(metadata=edit_options(bias=False)),
        r"missing \[\], unexpected \['layers.0.bias_ih', 'layers.1.bias_ih'\]"),
    "option calls for a missing bias": (
        dict(tensors=drop("layers.1.bias_mh")), r"missing \['layers.1.bias_mh'\], unexpected \[\]"),
    "extra tensor": (
        dict(tensors=add(layers__0__extra=np.zeros(3, np.float32))), r"unexpected \['layers.0.extra'\]"),
    "extra layer": (
        dict(metadata=edit_meta(num_layers="1")), r"num_layers=1 .* unexpected \['layers.1.bias_hh'"),
    "missing layer": (
        dict(metadata=edit_meta(num_layers="3")), r"missing \['layers.2.bias_hh'"),
    "independent recurrence contradicts weight_hh": (
        dict(metadata=edit_options(independent_recurrence=True)),
        r"independent_recurrence=True contradicts layers.0.weight_hh of shape \(4, 4\)"),
    "wrong shape": (
        dict(tensors=add(layers__1__weight_mh=np.zeros((16, 5), np.float32))),
        r"layers\[1\]\['weight_mh'\] must have shape \(4H,H\) = \(16, 4\).*got \(16, 5\)"),
    "layers that do not chain": (
        dict(tensors=add(layers__1__weight_ih=np.zeros((20, 5), np.float32))),
        r"layers\[1\] must take input_size = hidden_size of layer 0"),
    "one tensor of another dtype": (
        dict(tensors=add(layers__0__weight_hh=np.zeros((4, 4), np.float64))),
        r"recorded dtype float32 \(F32\), but \{'layers.0.weight_hh': 'F64'\} differ"),
    "recorded dtype contradicts tensors": (
        dict(metadata=edit_meta(dtype="float64")), r"recorded dtype float64 \(F64\), but .*'F32'"),
    "integer tensor": (
        dict(tensors=add(layers__0__bias_hh=np.zeros(4, np.int32))), r"'layers.0.bias_hh': 'I32'"),
    "unsupported recorded dtype": (
        dict(metadata=edit_meta(dtype="bfloat16")), r"'dtype' must be one of .*got 'bfloat16'"),
    "input_size contradicts tensors": (
        dict(metadata=edit_meta(input_size="7")), r"input_size=7 contradicts the tensors, which have input_size=3"),
    "hidden_size contradicts tensors": (
        dict(metadata=edit_meta(hidden_size="5")), r"hidden_size=5 contradicts the tensors"),
    "unknown integration mode": (
        dict(metadata=edit_options(integration_mode="mult")), r"integration_mode must be one of .*got 'mult'"),
    "option not a boolean": (
        dict(metadata=edit_options(bias="yes")), r"option bias must be true or false, got 'yes'"),
    "options not JSON": (
        dict(metadata=edit_meta(options="{bias: true")), r"metadata 'options' is not valid JSON"),
    "options with an unknown key": (
        dict(metadata=edit_options(peephole=True)), r"exactly the keys"),
    "num_layers not a number": (
        dict(metadata=edit_meta(num_layers="two")), r"'num_layers' must be a positive integer, got 'two'"),
    "newer format version": (
        dict(metadata=edit_meta(format_version="3")),
        r"format_version '3' is not one this library reads \(1, 2\); .*newer"),
    "unknown format version": (
        dict(metadata=edit_meta(format_version="one")), r"format_version 'one' is not one this library reads"),
    "another format": (
        dict(metadata=edit_meta(format="pytorch")), r"metadata 'format' is 'pytorch', expected 'mlstm-spec.weights'"),
    "another formulation": (
        dict(metadata=edit_meta(formulation="LuxRecurrentLayers.jl 0.1.2")), r"metadata 'formulation' is"),
    "another layout": (
        dict(metadata=edit_meta(layout="ih: m,i,f,z,o")), r"metadata 'layout' is 'ih: m,i,f,z,o'"),
    "a required key removed": (
        dict(metadata=edit_meta(hidden_size=None)), r"metadata is missing \['hidden_size'\]"),
    "no metadata at all": (
        dict(metadata=lambda meta: {}, fix_checksum=False),
        r"has no __metadata__, so this is not an mlstm-spec.weights file"),
}


@pytest.mark.parametrize("edit", HAND_EDITS, ids=lambda s: s.replace(" ", "-"))
def test_hand_edited_file_is_rejected_with_a_clear_error(saved, edit):
    path, _ = saved
    changes, message = HAND_EDITS[edit]
    rewrite(path, **changes)
    with pytest.raises(mlstm_spec.WeightFileError, match=message) as caught:
        mlstm_spec.load(path)
    assert str(caught.value).startswith(f"{path}: ")


def test_an_edit_without_a_new_checksum_is_a_checksum_mismatch(saved):
    path, _ = saved
    rewrite(path, metadata=edit_options(integration_mode="multiplicative_integration"), fix_checksum=False)
    with pytest.raises(mlstm_spec.WeightFileError, match="checksum mismatch"):
        mlstm_spec.load(path)
    # the edit is otherwise consistent, so without the checksum it loads, with the edited option
    assert mlstm_spec.load(path, verify_checksum=False).integration_mode == "multiplicative_integration"


def test_a_file_without_checksum_needs_verify_checksum_false(saved):
    path, layers = saved
    rewrite(path, metadata=edit_meta(checksum=None), fix_checksum=False)
    with pytest.raises(mlstm_spec.WeightFileError, match="no 'checksum'; pass verify_checksum=False"):
        mlstm_spec.load(path)
    assert_bit_identical(mlstm_spec.load(path, verify_checksum=False).layers, layers)


def test_checksum_covers_metadata_and_tensors():
    tensors = {"a": ("F32", (2,), b"\0" * 8)}
    base = weight_io.checksum(tensors, {"k": "v"})
    assert base == weight_io.checksum(tensors, {"k": "v", "checksum": "ignored"})
    assert base != weight_io.checksum(tensors, {"k": "w"})
    assert base != weight_io.checksum({"a": ("F32", (2, 1), b"\0" * 8)}, {"k": "v"})
    assert base != weight_io.checksum({"a": ("F64", (1,), b"\0" * 8)}, {"k": "v"})
    assert base != weight_io.checksum({"b": ("F32", (2,), b"\0" * 8)}, {"k": "v"})
    # fields are length-prefixed, so moving bytes between name and value changes the digest
    assert weight_io.checksum({}, {"ab": "c"}) != weight_io.checksum({}, {"a": "bc"})


# ---- the optional dependency ----

def test_import_does_not_load_safetensors():
    code = "import sys, mlstm_spec; print('safetensors' in sys.modules)"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "False"


def test_missing_safetensors_names_the_extra(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "safetensors", None)
    monkeypatch.setitem(sys.modules, "safetensors.numpy", None)
    with pytest.raises(ImportError, match=r"pip install 'mlstm-spec\[io\]'"):
        mlstm_spec.save(tmp_path / "w.safetensors", make_stack(num_layers=1))
    with pytest.raises(ImportError, match=r"mlstm-spec\[io\]"):
        mlstm_spec.load(tmp_path / "w.safetensors")


# ---- the documented layout is the code's ----

def test_docs_state_the_layout_the_code_writes(saved):
    doc = (Path(__file__).resolve().parents[1] / "docs" / "interop.md").read_text()
    rows = re.findall(r"^\| `layers\.\{l\}\.(\w+)` \| `\(([^)]*)\)`", doc, re.M)
    assert {name: tuple(p.strip() for p in shape.split(",") if p.strip()) for name, shape in rows} == \
        mlstm_spec.PARAM_SHAPES
    path, _ = saved
    _, meta = read(path)
    for key in meta:
        assert f"`{key}`" in doc, f"metadata key {key!r} is not documented in docs/interop.md"
    assert "m, i, o, f, z" in doc and "m, i, f, z, o" in doc  # canonical and torchrecurrent orders
