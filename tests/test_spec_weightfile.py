"""Weight files and the variants: format version 2 holds a projection, peepholes and the run-time
options; a model without them is still written as version 1, with exactly the tensors and metadata the
library wrote before the variants existed (``tests/data/weights_format_v1.safetensors`` was written
then)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

import mlstm_spec
from mlstm_spec import io as weight_io

safetensors_numpy = pytest.importorskip("safetensors.numpy", reason="weight files need the io extra")

V1_FILE = Path(__file__).parent / "data" / "weights_format_v1.safetensors"
CODES = {"float16": "F16", "float32": "F32", "float64": "F64"}


def rewrite(path, edit):
    """Rewrite ``path`` with its metadata passed through ``edit`` and a fresh checksum."""
    raw, meta = weight_io.read_raw(path)
    arrays = {name: np.frombuffer(data, dtype={"F16": "<f2", "F32": "<f4", "F64": "<f8"}[code]).reshape(shape)
              for name, (code, shape, data) in raw.items()}
    meta = edit(dict(meta))
    meta["checksum"] = weight_io.checksum(
        {n: (CODES[a.dtype.name], a.shape, a.tobytes()) for n, a in arrays.items()}, meta)
    Path(path).write_bytes(safetensors_numpy.save(arrays, metadata=meta))


def with_options(**changes):
    def edit(meta):
        meta["options"] = json.dumps(dict(json.loads(meta["options"]), **changes))
        return meta
    return edit


def test_a_model_without_variants_is_written_as_the_same_version_1_file(tmp_path):
    before = mlstm_spec.load(V1_FILE)
    again = mlstm_spec.save(tmp_path / "again.safetensors", before.layers,
                            integration_mode=before.integration_mode, metadata=before.metadata)
    old_raw, old_meta = weight_io.read_raw(V1_FILE)
    new_raw, new_meta = weight_io.read_raw(again)
    assert new_meta["format_version"] == "1"
    # Every tensor byte and every metadata entry. (Not the file's bytes: safetensors writes the
    # metadata entries in an order that changes from one process to the next, which the checksum,
    # taken over sorted entries, does not see.) A later release may only differ in its own name.
    assert new_raw == old_raw
    ignored = () if old_meta["library"] == new_meta["library"] else ("library", "checksum")
    assert {k: v for k, v in new_meta.items() if k not in ignored} == {
        k: v for k, v in old_meta.items() if k not in ignored}


VARIANT_MODELS = {
    "projection": (dict(proj_size=2), dict()),
    "peepholes": (dict(peepholes=True), dict()),
    "cell_clip only": (dict(), dict(cell_clip=0.5)),
    "forget_bias only": (dict(), dict(forget_bias=1.0)),
    "everything": (dict(proj_size=3, peepholes=True), dict(cell_clip=2.0, proj_clip=0.25, forget_bias=-1.0)),
}


@pytest.mark.parametrize("name", VARIANT_MODELS)
def test_a_model_with_variants_round_trips_through_a_version_2_file(name, tmp_path):
    structure, runtime = VARIANT_MODELS[name]
    rng = np.random.default_rng(3)
    first = mlstm_spec.init_params(3, 5, rng=rng, dtype=np.float64, **structure)
    layers = [first, mlstm_spec.init_params(mlstm_spec.check_params(first).output_size, 5, rng=rng,
                                            dtype=np.float64, **structure)]
    path = mlstm_spec.save(tmp_path / "model.safetensors", layers, metadata={"step": "7"}, **runtime)
    _, meta = weight_io.read_raw(path)
    assert meta["format_version"] == "2"
    stored = json.loads(meta["options"])
    assert stored == dict(bias=True, recurrent_bias=True, multiplicative_bias=True, independent_recurrence=False,
                          integration_mode="addition", proj_size=structure.get("proj_size", 0),
                          peepholes=structure.get("peepholes", False), cell_clip=runtime.get("cell_clip"),
                          proj_clip=runtime.get("proj_clip"), forget_bias=runtime.get("forget_bias", 0.0))
    loaded = mlstm_spec.load(path)
    assert loaded.options == dict(bias=True, recurrent_bias=True, multiplicative_bias=True,
                                  independent_recurrence=False, integration_mode="addition",
                                  **structure, **runtime)
    assert loaded.metadata == {"step": "7"}
    for got, want in zip(loaded.layers, layers):
        assert sorted(got) == sorted(want)
        for key in want:
            assert got[key].tobytes() == want[key].tobytes() and got[key].shape == want[key].shape, key
    # the recorded options run the model as it was trained
    xs = rng.standard_normal((2, 4, 3))
    run_options = {k: v for k, v in loaded.options.items() if k in mlstm_spec.RUNTIME_DEFAULTS}
    assert run_options == runtime
    np.testing.assert_array_equal(mlstm_spec.forward(loaded.layers[0], xs, **run_options)[0],
                                  mlstm_spec.forward(first, xs, **runtime)[0])


@pytest.fixture
def variant_file(tmp_path):
    layer = mlstm_spec.init_params(3, 5, rng=0, proj_size=2, peepholes=True)
    return mlstm_spec.save(tmp_path / "variants.safetensors", layer, cell_clip=1.0, proj_clip=0.5)


@pytest.mark.parametrize("edit, message", [
    (with_options(proj_size=3), r"option proj_size=3 contradicts layers\.0\.weight_hr of shape \(2, 5\)"),
    (with_options(proj_size=0), r"unexpected \['layers\.0\.weight_hr'\]"),
    (with_options(peepholes=False), r"unexpected \['layers\.0\.weight_cf', 'layers\.0\.weight_ci', 'layers\.0\.weight_co'\]"),
    (with_options(proj_size=True), r"option proj_size must be an integer >= 0, got True"),
    (with_options(peepholes="yes"), r"option peepholes must be true or false, got 'yes'"),
    (with_options(cell_clip=-1), r"option cell_clip must be None or a finite number > 0, got -1"),
    (with_options(forget_bias=None), r"option forget_bias must be a finite number, got NoneType None"),
    (lambda meta: dict(meta, options=json.dumps({k: v for k, v in json.loads(meta["options"]).items()
                                                 if k != "proj_clip"})),
     r"exactly the keys .*'proj_clip', 'forget_bias'\] \(format version 2\)"),
    (lambda meta: dict(meta, format_version="1"), r"metadata 'formulation' is .*Variants\)\", expected"),
    (lambda meta: dict(meta, format_version="4"),
     r"format_version '4' is not one this library reads \(1, 2, 3\); it was written by a newer mlstm-spec"),
    (lambda meta: dict(meta, directions="2"), r"metadata 'directions' \('2'\) needs format_version 3, but the file "
                                              r"says 2"),
], ids=["proj_size contradicts", "projection not declared", "peepholes not declared", "proj_size a bool",
        "peepholes not a bool", "negative cell_clip", "forget_bias null", "an option missing",
        "version 2 content labelled 1", "version 4", "directions in version 2"])
def test_a_version_2_file_that_contradicts_itself_is_refused(variant_file, edit, message):
    rewrite(variant_file, edit)
    with pytest.raises(weight_io.WeightFileError, match=message):
        mlstm_spec.load(variant_file)


def test_proj_clip_without_a_projection_is_refused_on_save_and_load(tmp_path):
    plain = mlstm_spec.init_params(3, 5, rng=0)
    with pytest.raises(ValueError, match=r"proj_clip=0\.5 clips the projected output, but the parameters have no"):
        mlstm_spec.save(tmp_path / "x.safetensors", plain, proj_clip=0.5)
    path = mlstm_spec.save(tmp_path / "y.safetensors", plain, cell_clip=1.0)
    rewrite(path, with_options(proj_clip=0.5))
    with pytest.raises(weight_io.WeightFileError, match=r"option proj_clip=0\.5 clips the projected output"):
        mlstm_spec.load(path)
