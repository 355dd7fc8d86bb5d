"""The weight file records the number of directions (issue 12, item 1): a bidirectional torch layer saves
and loads bit-exactly as format version 3, files of one direction are unchanged, and the unidirectional
backends refuse a two-direction file with a message saying so."""

from __future__ import annotations

import numpy as np
import pytest
from helpers import random_params, require_backend
from safetensors import numpy as safetensors_numpy

import mlstm_spec
from mlstm_spec import io as weight_io

CODES = {"float16": "F16", "float32": "F32", "float64": "F64"}


def bidirectional_stack(rng, input_size, hidden, num_layers):
    """Canonical mappings in nn.LSTM's order (layer 0 forward, layer 0 reverse, layer 1 forward, ...)."""
    return [random_params(rng, input_size if k < 2 else 2 * hidden, hidden, scale=0.5)
            for k in range(2 * num_layers)]


def rewrite(path, edit_metadata=lambda meta: meta, edit_tensors=lambda arrays: arrays):
    """Rewrite a weight file with its metadata and tensors edited, under a fresh checksum."""
    raw, meta = weight_io.read_raw(path)
    arrays = {name: np.frombuffer(data, dtype={"F16": "<f2", "F32": "<f4", "F64": "<f8"}[code]).reshape(shape)
              for name, (code, shape, data) in raw.items()}
    arrays, meta = edit_tensors(dict(arrays)), edit_metadata(dict(meta))
    meta["checksum"] = weight_io.checksum({n: (CODES[a.dtype.name], a.shape, a.tobytes()) for n, a in arrays.items()},
                                          meta)
    path.write_bytes(safetensors_numpy.save(arrays, metadata=meta))


def assert_same_layers(got, want):
    assert len(got) == len(want)
    for g, w in zip(got, want):
        assert sorted(g) == sorted(w)
        for name in w:
            assert g[name].dtype == w[name].dtype and np.array_equal(g[name], w[name]), name


@pytest.mark.parametrize("input_size, num_layers", [(3, 2), (4, 1)], ids=["I!=H, 2 layers", "I=H, 1 layer"])
def test_a_list_of_mappings_saved_with_two_directions(tmp_path, input_size, num_layers):
    layers = bidirectional_stack(np.random.default_rng(0), input_size, 4, num_layers)
    path = mlstm_spec.save(tmp_path / "bi.safetensors", layers, directions=2,
                           integration_mode="multiplicative_integration")
    raw, meta = weight_io.read_raw(path)
    assert (meta["format_version"], meta["directions"], meta["num_layers"]) == ("3", "2", str(num_layers))
    assert meta["layout"] == weight_io.LAYOUT_V3
    assert {f"layers.{l}.reverse.weight_ih" for l in range(num_layers)} <= set(raw)
    loaded = mlstm_spec.load(path)
    assert (loaded.directions, loaded.num_layers, loaded.input_size) == (2, num_layers, input_size)
    assert loaded.options == dict(bias=True, recurrent_bias=True, multiplicative_bias=True,
                                  independent_recurrence=False, integration_mode="multiplicative_integration",
                                  bidirectional=True)
    assert_same_layers(loaded.layers, layers)
    # a loaded file saves back to the same tensors and metadata
    again = mlstm_spec.save(tmp_path / "again.safetensors", loaded)
    assert weight_io.read_raw(again) == weight_io.read_raw(path)


def test_one_direction_stays_the_old_file(tmp_path):
    layer = random_params(np.random.default_rng(1), 3, 4)
    path = mlstm_spec.save(tmp_path / "one.safetensors", layer, directions=1)
    _, meta = weight_io.read_raw(path)
    assert meta["format_version"] == "1" and "directions" not in meta
    loaded = mlstm_spec.load(path)
    assert loaded.directions == 1 and "bidirectional" not in loaded.options


def test_save_refuses_a_stack_that_is_not_two_directions(tmp_path):
    layers = bidirectional_stack(np.random.default_rng(2), 3, 4, 2)
    path = tmp_path / "w.safetensors"
    with pytest.raises(ValueError, match=r"layers holds 3 mappings; a stack with 2 directions needs a multiple of 2"):
        mlstm_spec.save(path, layers[:3], directions=2)
    with pytest.raises(ValueError, match=r"layers\[2\] \(layer 1, direction 0\) must have I=8 and H=4, got I=4"):
        mlstm_spec.save(path, [layers[0], layers[1], *bidirectional_stack(np.random.default_rng(3), 4, 4, 1)],
                        directions=2)
    with pytest.raises(ValueError, match=r"directions must be one of \(1, 2\) \(2: a bidirectional stack\), got 3"):
        mlstm_spec.save(path, layers, directions=3)
    assert not path.exists()


@pytest.mark.parametrize("edit, message", [
    (dict(metadata=lambda meta: {k: v for k, v in meta.items() if k != "directions"}),
     r"metadata 'directions' must be \"2\" in format_version 3 \(a bidirectional stack\), got None"),
    (dict(metadata=lambda meta: dict(meta, directions="1")), r"metadata 'directions' must be \"2\" .*got '1'"),
    (dict(metadata=lambda meta: dict(meta, format_version="2")), r"metadata 'layout' is .*, expected"),
    (dict(tensors=lambda arrays: {k: v for k, v in arrays.items() if not k.startswith("layers.0.reverse.")}),
     r"missing \['layers\.0\.reverse\.bias_hh'"),
], ids=["directions missing", "directions 1 in version 3", "labelled version 2", "reverse direction missing"])
def test_a_two_direction_file_that_contradicts_itself_is_refused(tmp_path, edit, message):
    path = mlstm_spec.save(tmp_path / "bi.safetensors", bidirectional_stack(np.random.default_rng(4), 3, 4, 1),
                           directions=2)
    rewrite(path, edit.get("metadata", lambda meta: meta), edit.get("tensors", lambda arrays: arrays))
    with pytest.raises(weight_io.WeightFileError, match=message):
        mlstm_spec.load(path)


# ---- the torch layer ----

@pytest.mark.parametrize("input_size, num_layers, variants", [(3, 2, {}), (4, 1, {}),
                                                                (3, 2, dict(proj_size=2, peepholes=True))],
                         ids=["I!=H, 2 layers", "I=H, 1 layer", "projection and peepholes"])
def test_torch_bidirectional_layer_round_trips_bit_exactly(tmp_path, input_size, num_layers, variants):
    bt = require_backend("torch")
    import torch

    torch.manual_seed(0)
    model = bt.MLSTM(input_size, 4, num_layers, bidirectional=True, dtype=torch.float64,
                     integration_mode="multiplicative_integration", **variants)
    path = mlstm_spec.save(tmp_path / "bi.safetensors", model)
    loaded = mlstm_spec.load(path)
    assert (loaded.directions, loaded.num_layers) == (2, num_layers)
    for rebuilt in (bt.MLSTM.from_canonical(loaded), bt.MLSTM.from_canonical(loaded.layers, **loaded.options)):
        assert rebuilt.bidirectional and rebuilt.num_layers == num_layers
        assert rebuilt.integration_mode == "multiplicative_integration"
        state, want = rebuilt.state_dict(), model.state_dict()
        assert list(state) == list(want)
        assert all(torch.equal(state[name], want[name]) for name in want)
        x = torch.randn(5, 2, input_size, dtype=torch.float64)
        with torch.no_grad():
            got, expected = rebuilt(x), model(x)
        assert torch.equal(got[0], expected[0]) and torch.equal(got[1][0], expected[1][0])


def test_torch_refuses_a_direction_count_the_file_does_not_hold(tmp_path):
    bt = require_backend("torch")
    bi = mlstm_spec.load(mlstm_spec.save(tmp_path / "bi.safetensors", bt.MLSTM(3, 4, bidirectional=True)))
    one = mlstm_spec.load(mlstm_spec.save(tmp_path / "one.safetensors", bt.MLSTM(3, 4)))
    with pytest.raises(ValueError, match=r"weight file with 2 directions \(a bidirectional stack\), but this MLSTM "
                                         r"\(backends\.torch\) runs one direction"):
        bt.MLSTM.from_canonical(bi, bidirectional=False)
    with pytest.raises(ValueError, match=r"this MLSTMCell \(backends\.torch\) runs one direction"):
        bt.MLSTMCell.from_canonical(bi)
    with pytest.raises(ValueError, match=r"weight file with 1 direction, but bidirectional=True asks for 2"):
        bt.MLSTM.from_canonical(one, bidirectional=True)
    # the forward direction alone, as the message suggests
    forward = bt.MLSTM.from_canonical(bi.layers[0::2])
    assert not forward.bidirectional


@pytest.mark.parametrize("backend", ["jax", "tensorflow"])
def test_unidirectional_backends_refuse_a_two_direction_file(tmp_path, backend):
    module = require_backend(backend)
    path = mlstm_spec.save(tmp_path / "bi.safetensors", bidirectional_stack(np.random.default_rng(5), 3, 4, 1),
                           directions=2)
    loaded = mlstm_spec.load(path)
    with pytest.raises(ValueError, match=rf"weight file with 2 directions \(a bidirectional stack\), but this "
                                         rf"\w+ \(backends\.{backend}\) runs one direction"):
        module.MLSTM.from_canonical(loaded)
