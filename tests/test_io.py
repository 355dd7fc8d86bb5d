"""``mlstm_spec.save`` / ``load``: lossless round trips, and every kind of bad file rejected clearly.

Corrupt files are made three ways: truncated at every length, one bit flipped at every position, and
hand-edited (rewritten with safetensors directly, so the edit is a valid safetensors file whose content
contradicts itself; the checksum is recomputed where the test targets a later check).
"""

from __future__ import annotations

import errno
import json
import re
import os
import pickle
import stat
import subprocess
import sys
import threading
import tracemalloc
from pathlib import Path

import numpy as np
import pytest

import mlstm_spec
from helpers import gpu_required, require_backend
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


def safetensors_bytes(header, data=b""):
    """A safetensors file from a header (its JSON text) and the data bytes, unchecked."""
    raw = header.encode()
    return len(raw).to_bytes(8, "little") + raw + data


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
    with pytest.raises(TypeError, match=r"layers\['weight_ih'\] must be an array \(a numpy.ndarray, .*got list"):
        mlstm_spec.save(path, dict(a, weight_ih=a["weight_ih"].tolist()))
    with pytest.raises(ValueError, match="integration_mode must be one of"):
        mlstm_spec.save(path, a, integration_mode="mult")
    with pytest.raises(TypeError, match="metadata must be a mapping of str to str"):
        mlstm_spec.save(path, a, metadata={"step": 3})
    with pytest.raises(TypeError, match=r"dtype in \('float16', 'float32', 'float64', 'bfloat16'\), got int32"):
        mlstm_spec.save(path, {k: v.astype(np.int32) for k, v in a.items()})
    with pytest.raises(TypeError, match="non-empty list"):
        mlstm_spec.save(path, [])
    assert not path.exists()


def test_bfloat16_values_are_stored_as_float32_exactly(tmp_path):
    ml_dtypes = pytest.importorskip("ml_dtypes")
    layer, = make_stack(num_layers=1, special=False)
    narrow = {k: v.astype(ml_dtypes.bfloat16) for k, v in layer.items()}
    mlstm_spec.save(tmp_path / "w.safetensors", narrow)
    loaded = mlstm_spec.load(tmp_path / "w.safetensors")
    assert loaded.dtype == "float32"
    for name, value in narrow.items():
        assert loaded.layers[0][name].dtype == np.float32
        # exact: rounding back to bfloat16 changes nothing, and the widened values are the bfloat16 ones
        assert loaded.layers[0][name].astype(ml_dtypes.bfloat16).tobytes() == value.tobytes(), name
        assert np.array_equal(loaded.layers[0][name], value.astype(np.float32)), name


# ---- how save writes: permissions, durability, links, errors ----

posix_only = pytest.mark.skipif(os.name != "posix", reason="POSIX permissions, FIFOs and directory fsync")


@pytest.fixture
def umask():
    """Set the process umask for one test (each xdist worker is its own process)."""
    previous = os.umask(0o022)
    yield lambda value: os.umask(value)
    os.umask(previous)


def mode_of(path):
    return stat.S_IMODE(os.stat(path).st_mode)


@posix_only
@pytest.mark.parametrize("mask", [0o022, 0o077, 0o002, 0o027], ids=oct)
def test_a_new_file_gets_the_permissions_open_would_give_it(tmp_path, umask, mask):
    umask(mask)
    path = mlstm_spec.save(tmp_path / "w.safetensors", make_stack())
    assert mode_of(path) == 0o666 & ~mask


@posix_only
@pytest.mark.parametrize("mode", [0o640, 0o604, 0o666], ids=oct)
def test_an_existing_file_keeps_its_mode(tmp_path, umask, mode):
    umask(0o077)
    path = tmp_path / "w.safetensors"
    path.write_bytes(b"old")
    path.chmod(mode)
    mlstm_spec.save(path, make_stack())
    assert mode_of(path) == mode
    assert mlstm_spec.load(path).num_layers == 2


@posix_only
@pytest.mark.skipif(hasattr(os, "geteuid") and os.geteuid() == 0, reason="root may write read-only files")
def test_a_read_only_file_is_refused_as_open_would_refuse_it(tmp_path):
    path = tmp_path / "w.safetensors"
    path.write_bytes(b"old")
    path.chmod(0o444)
    with pytest.raises(PermissionError):
        mlstm_spec.save(path, make_stack())
    assert path.read_bytes() == b"old"


@posix_only
def test_the_file_is_flushed_before_the_rename_and_the_directory_after(tmp_path, monkeypatch):
    events = []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(descriptor):
        kind = "directory" if stat.S_ISDIR(os.fstat(descriptor).st_mode) else "file"
        events.append(("fsync", kind, os.fstat(descriptor).st_size if kind == "file" else None))
        real_fsync(descriptor)

    def replace(source, destination):
        events.append(("replace", Path(destination).name, None))
        real_replace(source, destination)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", replace)
    path = mlstm_spec.save(tmp_path / "w.safetensors", make_stack())
    size = path.stat().st_size
    assert events == [("fsync", "file", size), ("replace", "w.safetensors", None), ("fsync", "directory", None)]


@posix_only
def test_a_symlink_stays_a_link_and_its_target_is_replaced(tmp_path):
    (tmp_path / "store").mkdir()
    (tmp_path / "links").mkdir()
    target = tmp_path / "store" / "w.safetensors"
    mlstm_spec.save(target, make_stack(seed=1))
    link = tmp_path / "links" / "current.safetensors"
    link.symlink_to(Path("..") / "store" / "w.safetensors")  # relative, to another directory
    chained = tmp_path / "links" / "latest.safetensors"
    chained.symlink_to("current.safetensors")  # a link to the link
    second = make_stack(seed=2)
    assert mlstm_spec.save(chained, second) == chained
    assert chained.is_symlink() and os.readlink(chained) == "current.safetensors"
    assert link.is_symlink() and os.readlink(link) == str(Path("..") / "store" / "w.safetensors")
    assert_bit_identical(mlstm_spec.load(target).layers, second)
    assert sorted(os.listdir(tmp_path / "store")) == ["w.safetensors"]  # no temporary left
    assert sorted(os.listdir(tmp_path / "links")) == ["current.safetensors", "latest.safetensors"]


@posix_only
def test_a_dangling_symlink_creates_its_target_and_a_loop_is_an_error(tmp_path):
    dangling = tmp_path / "dangling.safetensors"
    dangling.symlink_to("new.safetensors")
    mlstm_spec.save(dangling, make_stack())
    assert dangling.is_symlink() and (tmp_path / "new.safetensors").is_file()
    assert mlstm_spec.load(dangling).num_layers == 2
    (tmp_path / "a").symlink_to("b")
    (tmp_path / "b").symlink_to("a")
    with pytest.raises(OSError) as caught:
        mlstm_spec.save(tmp_path / "a", make_stack())
    assert caught.value.errno == errno.ELOOP
    assert (tmp_path / "a").is_symlink() and (tmp_path / "b").is_symlink()


def test_a_failing_clean_up_never_masks_the_original_error(tmp_path, monkeypatch):
    path = tmp_path / "w.safetensors"
    mlstm_spec.save(path, make_stack(seed=1))
    before = path.read_bytes()

    def full_disk(source, destination):
        raise OSError(errno.ENOSPC, "No space left on device (simulated)")

    def unlink(name, *args, **kwargs):
        raise PermissionError(errno.EACCES, "Permission denied (simulated)", name)

    monkeypatch.setattr(os, "replace", full_disk)
    monkeypatch.setattr(os, "unlink", unlink)
    with pytest.raises(OSError) as caught:
        mlstm_spec.save(path, make_stack(seed=2))
    monkeypatch.undo()
    assert caught.value.errno == errno.ENOSPC, caught.value
    if sys.version_info >= (3, 11):
        assert any("could not be removed" in note for note in caught.value.__notes__)
    assert path.read_bytes() == before


def test_a_failed_write_leaves_nothing_behind(tmp_path, monkeypatch):
    path = tmp_path / "w.safetensors"

    def failing_fsync(descriptor):
        raise OSError(errno.EIO, "Input/output error (simulated)")

    monkeypatch.setattr(os, "fsync", failing_fsync)
    with pytest.raises(OSError, match="simulated"):
        mlstm_spec.save(path, make_stack())
    assert os.listdir(tmp_path) == []


@posix_only
def test_a_destination_that_is_not_a_regular_file_is_refused(tmp_path):
    fifo = tmp_path / "pipe"
    os.mkfifo(fifo)
    for destination, kind in ((tmp_path, "a directory"), (fifo, "a FIFO")):
        with pytest.raises(ValueError, match=rf"path must be a regular file or a new one, got .* which is {kind}"):
            mlstm_spec.save(destination, make_stack())
    assert stat.S_ISFIFO(os.stat(fifo).st_mode)
    assert sorted(os.listdir(tmp_path)) == ["pipe"]


# ---- what save accepts: any framework's arrays and layers ----

class ArrayOnly:
    """An array known only through ``__array__`` (as JAX arrays and TensorFlow tensors are)."""

    def __init__(self, array):
        self.array = array

    def __array__(self, dtype=None, copy=None):
        return self.array


class DLPackOnly:
    """An array known only through DLPack."""

    def __init__(self, array):
        self.array = array

    def __dlpack__(self, **kwargs):
        return self.array.__dlpack__(**kwargs)

    def __dlpack_device__(self):
        return self.array.__dlpack_device__()


class NeedsForce:
    """Like a torch tensor that requires grad or lives on a GPU: only ``numpy(force=True)`` copies it out."""

    def __init__(self, array):
        self.array = array

    def numpy(self, force=False):
        if not force:
            raise RuntimeError("Can't call numpy() on Tensor that requires grad (simulated)")
        return self.array.copy()

    def __array__(self, dtype=None, copy=None):
        return self.numpy()


class ExportsNoBfloat16:
    """Like a torch bfloat16 tensor: no NumPy export, but ``.float()`` widens it exactly."""

    dtype = "bfloat16"

    def __init__(self, array):
        self.array = array  # float32 values that are all bfloat16 values

    def numpy(self, force=False):
        raise TypeError("Got unsupported ScalarType BFloat16 (simulated)")

    def float(self):
        return ArrayOnly(self.array)


class FakeLayer:
    def __init__(self, layers, integration_mode, bidirectional=False):
        self.layers, self.integration_mode, self.bidirectional = layers, integration_mode, bidirectional

    def to_canonical(self):
        return [dict(layer) for layer in self.layers]


def test_save_takes_arrays_through_their_own_protocols(tmp_path):
    layer, = make_stack(num_layers=1, special=False)
    bfloat16_exact = np.round(layer["bias_mh"] * 64) / 64  # a few bits: exact in bfloat16
    wrapped = {"weight_ih": ArrayOnly(layer["weight_ih"]), "weight_hh": DLPackOnly(layer["weight_hh"]),
               "weight_mh": NeedsForce(layer["weight_mh"]), "bias_ih": layer["bias_ih"],
               "bias_hh": NeedsForce(layer["bias_hh"]), "bias_mh": ExportsNoBfloat16(bfloat16_exact)}
    mlstm_spec.save(tmp_path / "w.safetensors", wrapped)
    assert_bit_identical(mlstm_spec.load(tmp_path / "w.safetensors").layers, [dict(layer, bias_mh=bfloat16_exact)])


def test_save_names_a_value_that_is_no_array(tmp_path):
    layer, = make_stack(num_layers=1)

    class Broken:
        def __array__(self, dtype=None, copy=None):
            raise RuntimeError("device lost (simulated)")

    with pytest.raises(TypeError, match=r"layers\['weight_hh'\] must be an array .* got str"):
        mlstm_spec.save(tmp_path / "w.safetensors", dict(layer, weight_hh="0.5"))
    with pytest.raises(TypeError, match=r"layers\['bias_ih'\]: could not copy this Broken .*device lost"):
        mlstm_spec.save(tmp_path / "w.safetensors", dict(layer, bias_ih=Broken()))
    with pytest.raises(TypeError, match=r"layers\[1\] must be a canonical mapping or a layer with to_canonical\(\), "
                                        r"got int"):
        mlstm_spec.save(tmp_path / "w.safetensors", [layer, 3])
    assert not (tmp_path / "w.safetensors").exists()


def test_save_takes_layers_and_their_integration_mode(tmp_path):
    first, second = make_stack(num_layers=2)
    path = tmp_path / "w.safetensors"
    mlstm_spec.save(path, FakeLayer([first, second], "multiplicative_integration"))
    loaded = mlstm_spec.load(path)
    assert loaded.integration_mode == "multiplicative_integration"
    assert_bit_identical(loaded.layers, [first, second])
    # a list of one-layer objects is one stack
    mlstm_spec.save(path, [FakeLayer([first], "addition"), FakeLayer([second], "addition")])
    assert mlstm_spec.load(path).integration_mode == "addition"
    assert_bit_identical(mlstm_spec.load(path).layers, [first, second])
    with pytest.raises(ValueError, match=r"integration_mode='addition' contradicts the layers' own "
                                         r"integration_mode 'multiplicative_integration'"):
        mlstm_spec.save(path, FakeLayer([first], "multiplicative_integration"), integration_mode="addition")
    # a bidirectional layer's mappings (forward, reverse) are saved as two directions, never chained as a
    # deeper stack (with I = H they would chain)
    mlstm_spec.save(path, FakeLayer([second, second], "addition", bidirectional=True))
    loaded = mlstm_spec.load(path)
    assert (loaded.directions, loaded.num_layers, loaded.options["bidirectional"]) == (2, 1, True)
    assert_bit_identical(loaded.layers, [second, second])
    with pytest.raises(ValueError, match=r"directions=1 contradicts the layers, which have 2 directions"):
        mlstm_spec.save(path, FakeLayer([second, second], "addition", bidirectional=True), directions=1)
    with pytest.raises(ValueError, match=r"save a bidirectional layer on its own"):
        mlstm_spec.save(path, [FakeLayer([second, second], "addition", bidirectional=True), second])
    with pytest.raises(ValueError, match=r"layers mix integration_mode values \[.addition., .multiplicative_int"):
        mlstm_spec.save(path, [FakeLayer([first], "addition"), FakeLayer([second], "multiplicative_integration")])


@pytest.mark.parametrize("runtime", [{}, {"cell_clip": 3.0, "forget_bias": 1.0}], ids=["version-1", "version-2"])
def test_a_loaded_file_saves_back_to_the_same_content(tmp_path, runtime):
    # the same tensors and metadata, checksum included (safetensors orders the metadata at random,
    # so the bytes of two saves differ), with the options the tensors do not show
    first = tmp_path / "first.safetensors"
    mlstm_spec.save(first, make_stack(), integration_mode="multiplicative_integration", **runtime)
    again = mlstm_spec.save(tmp_path / "again.safetensors", mlstm_spec.load(first))
    assert weight_io.read_raw(again) == weight_io.read_raw(first)
    if runtime:
        with pytest.raises(ValueError, match=r"cell_clip=2.0 contradicts the layers' own cell_clip 3.0"):
            mlstm_spec.save(again, mlstm_spec.load(first), cell_clip=2.0)


def require_gpu(framework_has_gpu: bool, what: str):
    if not framework_has_gpu:
        if gpu_required():
            pytest.fail(f"MLSTM_REQUIRE_GPU is set, but {what} sees no GPU", pytrace=False)
        pytest.skip(f"no GPU visible to {what} on this machine")


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
def test_save_takes_torch_modules_and_tensors(tmp_path, device):
    bt = require_backend("torch")
    import torch

    require_gpu(device == "cpu" or torch.cuda.is_available(), "torch")
    model = bt.MLSTM(3, 4, num_layers=2, integration_mode="multiplicative_integration", device=device)
    assert all(p.requires_grad for p in model.parameters())
    path = tmp_path / "w.safetensors"
    mlstm_spec.save(path, model)
    loaded = mlstm_spec.load(path)
    assert loaded.integration_mode == "multiplicative_integration"
    assert_bit_identical(loaded.layers, model.to_canonical())
    # a mapping of the module's own parameters (requires_grad, maybe on a GPU)
    mlstm_spec.save(path, model.layer_parameters(0))
    assert_bit_identical(mlstm_spec.load(path).layers, model.to_canonical()[:1])
    # a bidirectional layer is saved with both directions (round trips: tests/test_torch_speed.py)
    mlstm_spec.save(path, bt.MLSTM(4, 4, bidirectional=True))  # I = H: never read as two chained layers
    assert (mlstm_spec.load(path).num_layers, mlstm_spec.load(path).directions) == (1, 2)
    # bfloat16 tensors, which export to no NumPy type: stored as float32, exactly
    narrow = {name: p.detach().to(torch.bfloat16) for name, p in model.layer_parameters(1).items()}
    mlstm_spec.save(path, narrow)
    assert_bit_identical(mlstm_spec.load(path).layers,
                         [{name: t.float().cpu().numpy() for name, t in narrow.items()}])


def test_save_takes_jax_modules_and_arrays(tmp_path):
    bj = require_backend("jax")
    import jax.numpy as jnp
    import ml_dtypes

    path = tmp_path / "w.safetensors"
    layer, = make_stack(num_layers=1, special=False, independent_recurrence=True)
    params = {k: jnp.asarray(v) for k, v in layer.items()}  # what backends.jax.init returns
    mlstm_spec.save(path, params)
    assert_bit_identical(mlstm_spec.load(path).layers, [layer])
    model = bj.MLSTM.from_canonical(make_stack(special=False), integration_mode="multiplicative_integration")
    mlstm_spec.save(path, model)
    assert mlstm_spec.load(path).integration_mode == "multiplicative_integration"
    assert_bit_identical(mlstm_spec.load(path).layers, model.to_canonical())
    mlstm_spec.save(path, model.layers, integration_mode="multiplicative_integration")
    assert_bit_identical(mlstm_spec.load(path).layers, model.to_canonical())
    narrow = {k: jnp.asarray(v.astype(ml_dtypes.bfloat16)) for k, v in layer.items()}
    mlstm_spec.save(path, narrow)
    assert_bit_identical(mlstm_spec.load(path).layers,
                         [{k: v.astype(ml_dtypes.bfloat16).astype(np.float32) for k, v in layer.items()}])


def test_save_takes_keras_layers_and_tensorflow_values(tmp_path):
    btf = require_backend("tensorflow")
    import tensorflow as tf

    layer, = make_stack(num_layers=1, special=False)
    path = tmp_path / "w.safetensors"
    keras_layer = btf.MLSTM.from_canonical(layer, integration_mode="multiplicative_integration")
    mlstm_spec.save(path, keras_layer)
    assert mlstm_spec.load(path).integration_mode == "multiplicative_integration"
    assert_bit_identical(mlstm_spec.load(path).layers, [layer])
    mlstm_spec.save(path, {k: tf.Variable(v) for k, v in layer.items()})
    assert_bit_identical(mlstm_spec.load(path).layers, [layer])
    narrow = {k: tf.cast(tf.constant(v), tf.bfloat16) for k, v in layer.items()}
    mlstm_spec.save(path, narrow)
    assert_bit_identical(mlstm_spec.load(path).layers,
                         [{k: tf.cast(v, tf.float32).numpy() for k, v in narrow.items()}])


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
        dict(metadata=edit_meta(format_version="4")),
        r"format_version '4' is not one this library reads \(1, 2, 3\); .*newer"),
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


# ---- hostile files: each a WeightFileError naming the file, in time and memory set by its size ----

def load_measured(path, **kwargs):
    """``load(path)``'s result or WeightFileError, and the peak traced memory (bytes) it took."""
    tracemalloc.start()
    try:
        try:
            outcome = mlstm_spec.load(path, **kwargs)
        except mlstm_spec.WeightFileError as error:
            outcome = error
        return outcome, tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def assert_refused(path, match, max_memory=None, **kwargs):
    __tracebackhide__ = True
    outcome, peak = load_measured(path, **kwargs)
    assert isinstance(outcome, mlstm_spec.WeightFileError), f"loaded {outcome!r}"
    assert str(outcome).startswith(f"{path}: "), outcome
    assert re.search(match, str(outcome)), outcome
    if max_memory is not None:
        assert peak <= max_memory, f"took {peak} bytes, more than {max_memory}, for a {path.stat().st_size}-byte file"
    assert len(str(outcome)) < 2000, "messages quote the file's contents only briefly"
    return outcome


def test_a_huge_num_layers_is_refused_before_anything_is_sized_by_it(saved):
    """Before: 100,000 layers in a 2 KB file (a valid checksum: anyone can compute one) took ~25 s and
    ~130 MB; 3,000,000 took 72 s and 3.9 GB."""
    path, _ = saved
    rewrite(path, metadata=edit_meta(num_layers="100000"))
    assert_refused(path, r"num_layers=100000 needs at least 300000 tensors .* but the file holds 12",
                   max_memory=16 * path.stat().st_size + 2**18)


@pytest.mark.parametrize("depth,message", [
    (1020, r"metadata 'options' is not valid JSON \((maximum recursion depth exceeded|Expecting value)"),
    (200_000, r"metadata 'options' must be a short JSON object \(at most 1024 characters\), got 200000 characters"),
])
def test_deeply_nested_options_are_refused(saved, depth, message):
    path, _ = saved
    rewrite(path, metadata=edit_meta(options="[" * depth))  # was a RecursionError
    assert_refused(path, message)


def test_a_deeply_nested_header_is_refused(saved, tmp_path):
    path, _ = saved
    broken = tmp_path / "nested.safetensors"
    broken.write_bytes(safetensors_bytes('{"a":' + "[" * 100_000 + "]" * 100_000 + "}"))
    assert_refused(broken, r"not a readable safetensors file .*not valid JSON|needs a dtype")


@pytest.mark.parametrize("key,value", [
    *[(key, "9" * 5000) for key in ("num_layers", "input_size", "hidden_size", "format_version")],
    # not num_layers: should both of its checks regress, 10**18 layers would exhaust the machine
    *[(key, "1" + "0" * 18) for key in ("input_size", "hidden_size", "format_version")],
], ids=lambda v: f"{len(v)}-digits" if v[:1].isdigit() else v)
def test_huge_integers_are_refused(saved, key, value):
    path, _ = saved
    rewrite(path, metadata=edit_meta(**{key: value}))  # 5000 digits was a bare ValueError from int()
    assert_refused(path, rf"{key}.* (must be a positive integer|is not one this library reads)")


@pytest.mark.parametrize("key,value", [("hidden_size", "\u0664"), ("hidden_size", "\uff14"),
                                       ("input_size", "\uff13"), ("num_layers", "\u0662")],
                         ids=["arabic-indic-4", "fullwidth-4", "fullwidth-3", "arabic-indic-2"])
def test_non_ascii_digits_are_not_integers(saved, key, value):
    path, _ = saved
    rewrite(path, metadata=edit_meta(**{key: value}))  # int() reads them as the right number: was loaded
    assert_refused(path, rf"metadata '{key}' must be a positive integer, got '{value}' .*ASCII digits")


def load_with_timeout(path, seconds=20):
    """Run load() in a thread; fail (instead of hanging the suite) if it blocks, after unblocking it."""
    outcome = {}

    def run():
        try:
            outcome["value"] = mlstm_spec.load(path)
        except BaseException as error:  # noqa: BLE001 - handed to the test
            outcome["value"] = error

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(seconds)
    if thread.is_alive():
        os.close(os.open(path, os.O_WRONLY | os.O_NONBLOCK))  # a writer end releases a blocked open()
        thread.join(seconds)
        pytest.fail(f"load({path}) blocked for {seconds} s")
    return outcome["value"]


@posix_only
def test_a_fifo_is_refused_without_blocking(tmp_path):
    fifo = tmp_path / "model.safetensors"
    os.mkfifo(fifo)
    link = tmp_path / "link.safetensors"
    link.symlink_to(fifo.name)
    for path in (fifo, link):
        error = load_with_timeout(path)  # was: blocked forever in open()
        assert isinstance(error, mlstm_spec.WeightFileError), error
        assert str(error) == (f"{path}: is a FIFO (named pipe), not a regular file; weight files are read only "
                              "from regular files")


@pytest.mark.parametrize("device", ["/dev/null", "/dev/zero"])
def test_a_device_is_refused_without_reading_it(device):
    """/dev/zero was read until MemoryError, so it runs in a child process with a memory ceiling."""
    if not os.path.exists(device) or not sys.platform.startswith("linux"):
        pytest.skip(f"needs Linux's {device} and RLIMIT_AS")
    code = (
        "import resource, mlstm_spec, safetensors\n"
        "used = int(open('/proc/self/statm').read().split()[0]) * resource.getpagesize()\n"
        "resource.setrlimit(resource.RLIMIT_AS, (used + 2**30, resource.getrlimit(resource.RLIMIT_AS)[1]))\n"
        f"try:\n    mlstm_spec.load({device!r})\n"
        "except BaseException as error:\n    print(type(error).__name__, error)\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                            env=dict(os.environ, OPENBLAS_NUM_THREADS="1"))
    assert result.stdout.strip() == (f"WeightFileError {device}: is a character device, not a regular file; "
                                     "weight files are read only from regular files"), result.stderr


def test_a_directory_is_refused(tmp_path):
    assert_refused(tmp_path, r"is a directory, not a regular file")  # was IsADirectoryError


@pytest.mark.parametrize("count", [20_000, 200_000])
def test_a_header_of_too_many_entries_is_refused_before_it_is_parsed(saved, count):
    """200,000 metadata keys (3.5 MB) took 5 s and 45 MB and loaded; 5 M keys took 36 s and 1.2 GB.
    Above 16,384 entries a header is refused: with more strings than that many entries can hold,
    before parsing (the file's bytes, read once for the header and once whole, are the peak);
    otherwise right after parsing."""
    path, _ = saved
    _, meta = read(path)
    rewrite(path, metadata=lambda meta: {**meta, **{f"user.{i}": "" for i in range(count)}})
    entries, tensors = count + len(meta), 12
    found = (f"{entries + tensors} entries" if count == 20_000
             else f"{2 * entries + 1 + 5 * tensors} strings")  # "__metadata__", 5 per tensor entry
    assert_refused(path, rf"its header holds {found}, more than {weight_io.MAX_HEADER_ENTRIES}",
                   max_memory=3 * path.stat().st_size + 2**20 if count == 200_000 else None)


def test_a_header_of_long_lists_is_refused_before_it_is_parsed(tmp_path):
    """A 4 MB shape list took 13 times the file's size to parse (the numbers are counted first now)."""
    path = tmp_path / "long.safetensors"
    path.write_bytes(safetensors_bytes(json.dumps({"t": {"dtype": "F32", "shape": [1] * 2_000_000,
                                                         "data_offsets": [0, 4]}}), b"\0" * 4))
    assert_refused(path, r"its header holds 2000002 commas between values, more than",
                   max_memory=3 * path.stat().st_size + 2**20)


def test_a_header_over_the_size_limit_is_refused_unread(saved, tmp_path):
    """A valid file whose header is padded with spaces (as safetensors itself pads) past the limit."""
    path, layers = saved
    data = path.read_bytes()
    length = int.from_bytes(data[:8], "little")
    pad = weight_io.MAX_HEADER_BYTES + 8 - length
    padded = tmp_path / "padded.safetensors"
    padded.write_bytes((length + pad).to_bytes(8, "little") + data[8 : 8 + length] + b" " * pad + data[8 + length :])
    assert_refused(padded, rf"header claims {length + pad} bytes; headers of at most {weight_io.MAX_HEADER_BYTES} "
                   "bytes are read", max_memory=2**16)
    small_pad = tmp_path / "small-pad.safetensors"  # the same padding within the limit loads
    small_pad.write_bytes((length + 64).to_bytes(8, "little") + data[8 : 8 + length] + b" " * 64 + data[8 + length :])
    assert_bit_identical(mlstm_spec.load(small_pad).layers, layers)


def test_duplicate_keys_are_refused(saved, tmp_path):
    """JSON readers disagree on duplicates (Python keeps the last, others the first), so the same
    checksummed file could hold different weights or options for different readers."""
    path, _ = saved
    data = path.read_bytes()
    length = int.from_bytes(data[:8], "little")
    header = data[8 : 8 + length].decode()
    _, meta = read(path)
    doubled = header.replace('"__metadata__":{', '"__metadata__":{"user.k":"1","user.k":"2",', 1)
    meta["user.k"] = "2"
    tensors, _ = weight_io.read_raw(path)
    new_checksum = weight_io.checksum(tensors, meta)
    doubled = doubled.replace(meta["checksum"], new_checksum)
    broken = tmp_path / "doubled.safetensors"
    broken.write_bytes(safetensors_bytes(doubled, data[8 + length :]))
    assert_refused(broken, r"not valid JSON: duplicate key 'user.k'")  # was loaded, with user.k = "2"


def test_messages_quote_names_and_values_from_the_file_briefly(saved):
    path, _ = saved
    rewrite(path, tensors=add(**{"x" * 5000: np.zeros(3, np.float32)}))
    assert_refused(path, r"unexpected \['xxxx[x]*'\.\.\. \(5000 characters\)\]")
    rewrite(path, tensors=drop("x" * 5000), metadata=edit_meta(formulation="y" * 10**6))
    assert_refused(path, r"metadata 'formulation' is 'yyyy[y]*'\.\.\. \(1000000 characters\), expected")


def test_a_file_longer_than_its_header_says_is_refused_unread(saved, tmp_path):
    """The size is compared with the header's offsets before the data is read (was: all read)."""
    path, _ = saved
    sparse = tmp_path / "sparse.safetensors"
    sparse.write_bytes(path.read_bytes())
    os.truncate(sparse, 64 * 2**20)
    assert_refused(sparse, r"the header describes \d+ bytes of tensor data, the file holds 671\d+",
                   max_memory=2**18)


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
