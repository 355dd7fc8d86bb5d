"""A bounded fuzz of ``mlstm_spec.load``: files made from a valid one (format version 1 or 2) by
Hypothesis-drawn edits, either to the metadata (huge, signed, padded and non-ASCII numbers, nested
JSON, many keys), with the checksum usually recomputed so that the later checks are reached, or to
the structure (tensor dtypes, shapes, offsets and names, the header's text and length, the bytes).

Every outcome must be a ``WeightFile`` or a ``WeightFileError`` whose message starts with the path;
a file that loads must have said its sizes in plain decimal; ``load_bytes`` must agree with ``load``;
and each load must stay within a time and a memory bound set by the file's size.
"""

from __future__ import annotations

import json
import os
import re
import tempfile
import time
import tracemalloc

import numpy as np
import pytest
from hypothesis import Phase, event, given, note, settings
from hypothesis import strategies as st

import mlstm_spec
from mlstm_spec import io as weight_io

pytest.importorskip("safetensors")

FLAGS = ("bias", "recurrent_bias", "multiplicative_bias", "independent_recurrence")
SIZE_KEYS = ("num_layers", "input_size", "hidden_size")
# Peak traced memory of one load <= MEMORY_PER_BYTE * file size + MEMORY_CONSTANT. Per byte: the
# file's bytes, the parser's copy of the tensor data and the returned arrays. The constant: the
# Python objects of a header within its limits (measured: 6 MB for 16,383 one-character metadata
# keys, 18 MB for 16,383 tensor entries; the fuzzed headers stay far below the second).
MEMORY_PER_BYTE = 3
MEMORY_CONSTANT = 20 * 2**20
# Wall time of one load <= TIME_CONSTANT + size / TIME_BYTES_PER_SECOND: generous for a shared CI
# core under tracemalloc; the failures this guards against took tens of seconds for 2 KB files.
TIME_CONSTANT = 5.0
TIME_BYTES_PER_SECOND = 2**20
OTHER_DIGITS = {"arabic-indic": "\u0660\u0661\u0662\u0663\u0664\u0665\u0666\u0667\u0668\u0669",
                "fullwidth": "\uff10\uff11\uff12\uff13\uff14\uff15\uff16\uff17\uff18\uff19"}


def sizes_written_otherwise(value: int):
    """``value`` as int() would read it, but not in the plain decimal a file must use."""
    text = str(value)
    in_script = st.sampled_from(sorted(OTHER_DIGITS)).map(
        lambda script: text.translate(str.maketrans("0123456789", OTHER_DIGITS[script])))
    decorated = st.sampled_from(["0" + text, "+" + text, " " + text, text + " ", text + "\n", "\t" + text])
    return st.one_of(in_script, decorated)


def metadata_values(key: str, true_sizes: dict):
    if key == "num_layers":
        # Below 50,000, or too long for int(): enough for a regression that sizes anything by it to
        # break the memory bound (~50 MiB) and fail, too little to exhaust the machine meanwhile.
        numbers = st.one_of(st.integers(-3, 50_000).map(str), st.integers(20_000, 50_000).map(str),
                            st.integers(4301, 6000).map(lambda n: "9" * n))
    else:  # only ever compared
        numbers = st.one_of(st.integers(-3, 10**30).map(str), st.integers(0, 3).map(lambda n: "1" + "0" * (17 + n)),
                            st.integers(300, 6000).map(lambda n: "9" * n))  # past Python's int-digit limit
    nested = st.one_of(st.integers(990, 1030), st.integers(1, 300_000)).map(lambda n: "[" * n)
    options = st.fixed_dictionaries({}, optional={
        "bias": st.one_of(st.booleans(), st.integers(0, 1)), "recurrent_bias": st.booleans(),
        "multiplicative_bias": st.booleans(), "independent_recurrence": st.booleans(),
        "integration_mode": st.sampled_from(["addition", "multiplicative_integration", "mult", ""]),
        "peephole": st.booleans()}).map(json.dumps)
    choices = [numbers, nested, options, st.text(max_size=30),
               st.sampled_from(["float16", "float32", "float64", "bfloat16", "F32", "1", "2", "NaN", ""])]
    if key in true_sizes:
        choices.insert(0, sizes_written_otherwise(true_sizes[key]))
    return st.one_of(*choices)


@st.composite
def valid_parts(draw):
    """The entries ``[name, code, shape, raw, offsets]`` and metadata of a valid file, and its sizes."""
    sizes = dict(num_layers=draw(st.integers(1, 3)), input_size=draw(st.integers(1, 3)),
                 hidden_size=draw(st.integers(1, 3)))
    dtype = draw(st.sampled_from(["float16", "float32", "float64"]))
    flags = {flag: draw(st.booleans()) for flag in FLAGS}
    layers = [mlstm_spec.init_params(sizes["input_size"] if k == 0 else sizes["hidden_size"], sizes["hidden_size"],
                                     rng=k, dtype=dtype, **flags) for k in range(sizes["num_layers"])]
    with tempfile.TemporaryDirectory() as directory:
        path = os.path.join(directory, "w.safetensors")
        runtime = draw(st.sampled_from([{}, {}, {"cell_clip": 3.0}, {"forget_bias": 1.0}]))  # version 1 or 2
        mlstm_spec.save(path, layers, integration_mode=draw(st.sampled_from(mlstm_spec.INTEGRATION_MODES)), **runtime)
        tensors, metadata = weight_io.read_raw(path)
    entries = [[name, code, list(shape), raw, None] for name, (code, shape, raw) in sorted(tensors.items())]
    return entries, metadata, sizes


def recompute_checksum(entries, metadata):
    metadata["checksum"] = weight_io.checksum(
        {name: (code, shape, raw) for name, code, shape, raw, _ in entries if isinstance(shape, list)}, metadata)


def serialize(entries, metadata) -> bytes:
    header, data, offset = {}, b"", 0
    if metadata is not None:
        header["__metadata__"] = metadata
    for name, code, shape, raw, offsets in entries:
        header[name] = {"dtype": code, "shape": shape,
                        "data_offsets": offsets if offsets is not None else [offset, offset + len(raw)]}
        offset += len(raw)
        data += raw
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    return len(text).to_bytes(8, "little") + text + data


@st.composite
def metadata_edited(draw):
    entries, metadata, sizes = draw(valid_parts())
    edits = draw(st.lists(st.sampled_from(["value"] * 6 + ["removed", "many keys"]), min_size=1, max_size=3))
    for edit in edits:
        if edit == "value":
            key = draw(st.sampled_from(SIZE_KEYS * 2 + weight_io._REQUIRED_KEYS + ("checksum", "user.note")))
            metadata[key] = draw(metadata_values(key, sizes))
        elif edit == "removed":
            metadata.pop(draw(st.sampled_from(sorted(metadata))))
        else:
            metadata.update({f"user.{i}": "" for i in range(draw(st.integers(0, 40_000)))})
    if draw(st.integers(0, 3)):  # usually: so that the checks after the checksum are reached
        recompute_checksum(entries, metadata)
    return serialize(entries, metadata), edits, metadata


@st.composite
def structure_edited(draw):
    entries, metadata, _ = draw(valid_parts())
    edits = draw(st.lists(st.sampled_from([
        "no metadata", "dtype", "shape", "offsets", "tensor removed", "tensor renamed", "nested header",
        "duplicate key", "header length", "header byte", "cut", "appended"]), min_size=1, max_size=3))
    for edit in edits:
        entry = draw(st.sampled_from(entries)) if entries else None
        if edit == "no metadata":
            metadata = None
        elif edit == "dtype" and entry:
            entry[1] = draw(st.sampled_from(["F16", "F32", "F64", "BF16", "I32", "U8", "F8_E4M3", "X", ""]))
        elif edit == "shape" and entry:
            entry[2] = draw(st.lists(st.integers(0, 2**40), max_size=4))
        elif edit == "offsets" and entry:
            entry[4] = draw(st.lists(st.integers(-1, 2**70), max_size=3))
        elif edit == "tensor removed" and entry:
            entries.remove(entry)
        elif edit == "tensor renamed" and entry:
            entry[0] = draw(st.sampled_from(["layers.0.weight_ih", "layers.7.bias_hh", "layers.-1.weight_mh",
                                             "layers.00.weight_hh", "__metadata__", "x" * 300]))
    if metadata is not None and draw(st.booleans()):
        recompute_checksum(entries, metadata)
    blob = serialize(entries, metadata)
    length = int.from_bytes(blob[:8], "little")
    text, data = blob[8:8 + length], blob[8 + length:]
    if "nested header" in edits:
        at = draw(st.integers(0, len(text)))
        text = text[:at] + b"[" * draw(st.integers(1, 200_000)) + text[at:]
    if "duplicate key" in edits and entries:
        first = json.dumps(entries[0][0]).encode()
        text = text.replace(b"," + first + b":", b"," + first + b':{"dtype":"F32","shape":[1],"data_offsets":[0,4]},'
                            + first + b":", 1)
    length = len(text)
    if "header length" in edits:
        length = draw(st.one_of(st.integers(0, 2**64 - 1), st.integers(max(0, length - 8), length + 8)))
    blob = length.to_bytes(8, "little") + text + data
    if "header byte" in edits:
        at = draw(st.integers(8, len(blob) - 1))
        blob = blob[:at] + bytes([draw(st.integers(0, 255))]) + blob[at + 1:]
    if "cut" in edits:
        blob = blob[:draw(st.integers(0, len(blob)))]
    if "appended" in edits:
        blob += draw(st.binary(min_size=1, max_size=64))
    return blob, edits, metadata


def outcome_of(call):
    """What ``call`` returned or the WeightFileError it raised, its wall time and peak traced memory."""
    tracemalloc.start()
    start = time.perf_counter()
    try:
        try:
            result = call()
        except mlstm_spec.WeightFileError as error:
            result = error
        return result, time.perf_counter() - start, tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


@pytest.fixture(scope="module")
def directory():
    with tempfile.TemporaryDirectory() as name:
        yield name


# No shrinking: a failing example is reported as drawn (its edits are in the notes), and a regression
# that costs memory fails once instead of being re-run for minutes while it is shrunk.
@settings(max_examples=200, phases=(Phase.explicit, Phase.reuse, Phase.generate), report_multiple_bugs=False)
@given(case=st.one_of(metadata_edited(), structure_edited()), verify_checksum=st.booleans())
def test_every_file_loads_or_is_refused_naming_it_within_bounds(directory, case, verify_checksum):
    blob, edits, metadata = case
    size = len(blob)
    note(f"edits {edits}, {size} bytes, verify_checksum={verify_checksum}")
    path = os.path.join(directory, "fuzzed.safetensors")
    with open(path, "wb") as file:
        file.write(blob)
    result, seconds, peak = outcome_of(lambda: mlstm_spec.load(path, verify_checksum=verify_checksum))
    note(f"outcome {str(result)[:300]!r}, {seconds:.3f} s, peak {peak} bytes")
    if isinstance(result, mlstm_spec.WeightFileError):
        assert str(result).startswith(f"{path}: "), result
        assert len(str(result)) < 2000, "a message quotes the file only briefly"
        event(re.sub(r"'[^']*'|\d+", "_", str(result)[len(path) + 2:])[:36])  # which check refused it
    else:
        assert isinstance(result, mlstm_spec.WeightFile), result
        event("loaded")
        assert result.num_layers == len(result.layers) >= 1
        assert result.layers[0]["weight_ih"].shape == (5 * result.hidden_size, result.input_size)
        assert all(a.dtype == np.dtype(result.dtype) for layer in result.layers for a in layer.values())
        for key in SIZE_KEYS:  # only plain decimal is a size: no sign, padding or other digits
            assert metadata[key] == str(getattr(result, key)), (key, metadata[key])
    assert peak <= MEMORY_PER_BYTE * size + MEMORY_CONSTANT, f"{peak} bytes for a {size}-byte file"
    assert seconds <= TIME_CONSTANT + size / TIME_BYTES_PER_SECOND, f"{seconds:.1f} s for a {size}-byte file"

    in_memory, _, _ = outcome_of(lambda: weight_io.load_bytes(blob, name=path, verify_checksum=verify_checksum))
    assert type(in_memory) is type(result)
    if isinstance(result, mlstm_spec.WeightFileError):
        assert str(in_memory) == str(result)
