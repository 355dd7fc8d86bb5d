"""The committed golden vectors (tests/data/golden/) for the Julia check: regenerated and compared,
checked against the spec and against finite differences, read the way SafeTensors.jl reads them, and
run through a NumPy emulation of docs/julia/check_golden.jl's feature-first (Julia) conventions; and,
since Julia cannot run here, held to what that script expects of them (its tables of cases, tensor
shapes and metadata keys, parsed from its text), so the files and the script cannot drift apart.
"""

from __future__ import annotations

import itertools
import json
import re
from pathlib import Path

import numpy as np
import pytest

import mlstm_spec
from mlstm_spec import golden
from mlstm_spec.conformance.tolerances import FLOOR, TOLERANCES, relative_error, tolerance

safetensors_numpy = pytest.importorskip("safetensors.numpy")

ROOT = Path(__file__).resolve().parents[1]
GOLDEN = ROOT / "tests" / "data" / "golden"
JULIA_SCRIPT = ROOT / "docs" / "julia" / "check_golden.jl"
FILES = sorted(GOLDEN.glob("*.safetensors"))
PARAM_NAMES = ("weight_ih", "weight_hh", "weight_mh", "bias_ih", "bias_hh", "bias_mh")
OPTION_KEYS = ("bias", "recurrent_bias", "multiplicative_bias", "integration_mode", "independent_recurrence",
               "batched", "T", "dtype")
# Regenerating elsewhere reruns BLAS and NumPy's SIMD exp/tanh, whose last bits differ between CPUs:
# float64 results may move by a few ulps (bounded here by 64 eps, norm-wise); float32 results are
# float64 values rounded once, so they can move by at most one float32 ulp.
REGENERATION_BOUND = {"float64": 64 * np.finfo(np.float64).eps, "float32": 2 * np.finfo(np.float32).eps}


def load_case(path):
    with safetensors_numpy.safe_open(path, framework="np") as f:  # noqa: SIM117
        return {name: f.get_tensor(name) for name in f.keys()}, f.metadata()


def case_params(tensors):
    return {name: tensors[name] for name in PARAM_NAMES if name in tensors}


def test_committed_files_exist_and_are_small():
    assert len(FILES) == 16
    total = sum(p.stat().st_size for p in GOLDEN.iterdir())
    assert total < 1_000_000, total


@pytest.fixture(scope="module")
def regenerated(tmp_path_factory):
    out = tmp_path_factory.mktemp("golden")
    assert golden.main(["--out", str(out)]) == 0
    return out


def test_regeneration_reproduces_the_committed_files(regenerated):
    assert sorted(p.name for p in regenerated.iterdir()) == sorted(p.name for p in GOLDEN.iterdir())
    assert json.loads((regenerated / "index.json").read_text()) == json.loads((GOLDEN / "index.json").read_text())
    worst = {}
    for path in FILES:
        committed, committed_meta = load_case(path)
        fresh, fresh_meta = load_case(regenerated / path.name)
        assert fresh_meta == committed_meta, path.name
        assert sorted(fresh) == sorted(committed), path.name
        dtype = committed_meta["dtype"]
        for name, value in committed.items():
            assert fresh[name].dtype == value.dtype and fresh[name].shape == value.shape, (path.name, name)
            if name in golden.DRAWN or name == "layout_probe":
                assert fresh[name].tobytes() == value.tobytes(), (
                    f"{path.name}:{name} differs: the drawn values changed (a NumPy Generator stream change?); "
                    "run `python -m mlstm_spec.golden` and review the diff")
            else:
                error, where = relative_error(fresh[name], value)
                worst[dtype] = max(worst.get(dtype, 0.0), error)
                assert error <= REGENERATION_BOUND[dtype], (
                    f"{path.name}:{name}[{where}] moved by {error:.3g}: the spec's results changed; "
                    "if intended, run `python -m mlstm_spec.golden` and commit the files")
    print(f"worst regeneration difference: {worst}")


def test_design_covers_every_combination_the_issue_asks_for():
    index = json.loads((GOLDEN / "index.json").read_text())
    cases = index["cases"]
    assert sorted(c["file"] for c in cases) == [p.name for p in FILES]
    rows = [{k: (c[k] > 1 if k == "T" else c[k]) for k in OPTION_KEYS} for c in cases]
    flags = ("bias", "recurrent_bias", "multiplicative_bias")
    for mode in mlstm_spec.INTEGRATION_MODES:  # every bias-flag combination, with each integration mode
        assert {tuple(r[f] for f in flags) for r in rows if r["integration_mode"] == mode} == set(
            itertools.product([False, True], repeat=3))
    assert {r["dtype"] for r in rows} == {"float32", "float64"}
    assert {c["T"] for c in cases} == {1, golden.LONG_T}
    for a, b in itertools.combinations(OPTION_KEYS, 2):  # every pair of options meets in all 4 combinations
        assert len({(r[a], r[b]) for r in rows}) == 4, (a, b)


@pytest.mark.parametrize("path", FILES, ids=lambda p: p.stem)
def test_file_matches_its_metadata(path):
    tensors, meta = load_case(path)
    I, H, T = int(meta["I"]), int(meta["H"]), int(meta["T"])
    batched = meta["batched"] == "true"
    lead = (int(meta["B"]),) if batched else ()
    flags = {f: meta[f] == "true" for f in ("bias", "recurrent_bias", "multiplicative_bias", "independent_recurrence")}
    info = mlstm_spec.check_params(case_params(tensors))
    assert info.options == flags
    assert (info.input_size, info.hidden_size, info.dtype) == (I, H, meta["dtype"])
    assert tensors["xs"].shape == lead + (T, I) and tensors["hs"].shape == lead + (T, H)
    for name in ("h0", "c0", "h_T", "c_T", "d_h_T", "d_c_T", "grad.h0", "grad.c0"):
        assert tensors[name].shape == lead + (H,), name
    assert {n for n in tensors if n.startswith("grad.")} == {f"grad.{n}" for n in case_params(tensors)} | {
        "grad.x", "grad.h0", "grad.c0"}
    assert all(t.dtype == np.dtype(meta["dtype"]) for t in tensors.values())
    assert np.array_equal(tensors["layout_probe"], np.arange(6).reshape(2, 3))
    assert meta["format"] == golden.FORMAT_NAME and meta["case"] == path.stem


@pytest.mark.parametrize("path", FILES, ids=lambda p: p.stem)
def test_outputs_are_what_the_spec_computes_in_the_files_dtype(path):
    """A float32 file's values are the float64 answer rounded; the spec run in float32 must land
    within float32's tolerance of them (and a float64 file's within float64's)."""
    tensors, meta = load_case(path)
    mode, dtype = meta["integration_mode"], meta["dtype"]
    state = (tensors["h0"], tensors["c0"])
    hs, (h_T, c_T) = mlstm_spec.forward(case_params(tensors), tensors["xs"], state, integration_mode=mode)
    grads = mlstm_spec.backward(case_params(tensors), tensors["xs"], state, tensors["d_hs"],
                                (tensors["d_h_T"], tensors["d_c_T"]), integration_mode=mode)
    computed = dict(hs=hs, h_T=h_T, c_T=c_T, **{f"grad.{k}": v for k, v in grads.items()})
    for name, value in computed.items():
        error, where = relative_error(value, tensors[name])
        assert error <= tolerance(dtype), f"{path.name}:{name}[{where}] error {error:.3g}"


def loss(tensors, params, xs, h0, c0, mode):
    hs, (h_T, c_T) = mlstm_spec.forward(params, xs, (h0, c0), integration_mode=mode)
    return float(np.sum(hs * tensors["d_hs"]) + np.sum(h_T * tensors["d_h_T"]) + np.sum(c_T * tensors["d_c_T"]))


@pytest.mark.parametrize("path", [p for p in FILES if "float64" in p.name], ids=lambda p: p.stem)
def test_gradients_are_those_of_the_documented_loss(path):
    """Central differences of L = sum(hs .* d_hs) + sum(h_T .* d_h_T) + sum(c_T .* d_c_T) -- the loss
    the Julia script differentiates -- at three entries of every gradient."""
    tensors, meta = load_case(path)
    assert meta["loss"] == golden.LOSS
    mode = meta["integration_mode"]
    inputs = dict(case_params(tensors), x=tensors["xs"], h0=tensors["h0"], c0=tensors["c0"])
    rng = np.random.default_rng(0)
    step = 1e-6
    for name in inputs:
        for flat in rng.choice(inputs[name].size, size=min(3, inputs[name].size), replace=False):
            values = []
            for sign in (1, -1):
                moved = {k: v.copy() for k, v in inputs.items()}
                moved[name].flat[flat] += sign * step
                params = {k: moved[k] for k in PARAM_NAMES if k in moved}
                values.append(loss(tensors, params, moved["x"], moved["h0"], moved["c0"], mode))
            numeric = (values[0] - values[1]) / (2 * step)
            stored = tensors[f"grad.{name}"].flat[flat]
            assert abs(numeric - stored) <= 1e-7 * max(1.0, abs(stored)), (name, flat, numeric, stored)


# ---- what the Julia side relies on ----

def julia_reverse_axes(a):
    """``permutedims(a, ndims(a):-1:1)``: SafeTensors.jl's (B, T, I) becomes Julia's (I, T, B)."""
    return np.transpose(a, tuple(range(a.ndim))[::-1])


def julia_cell(W, x, h, c, mode):
    """One step in Julia's column convention: x (I,) or (I, B), h and c (H,) or (H, B); W by name."""
    H = c.shape[0]
    column = (lambda v: v) if x.ndim == 1 else (lambda v: v[:, None])
    proj_ih = W["weight_ih"] @ x + (column(W["bias_ih"]) if "bias_ih" in W else 0)
    w_hh = W["weight_hh"]
    proj_hh = (column(w_hh) * h if w_hh.ndim == 1 else w_hh @ h) + (column(W["bias_hh"]) if "bias_hh" in W else 0)
    gx = [proj_ih[k * H:(k + 1) * H] for k in range(5)]
    m = gx[0] * proj_hh
    proj_mh = W["weight_mh"] @ m + (column(W["bias_mh"]) if "bias_mh" in W else 0)
    gm = [proj_mh[k * H:(k + 1) * H] for k in range(4)]
    combine = np.add if mode == "addition" else np.multiply
    logistic = lambda a: 1 / (1 + np.exp(-a))  # noqa: E731
    i, o, f = (logistic(combine(gx[k + 1], gm[k])) for k in range(3))
    z = np.tanh(combine(gx[4], gm[3]))
    c = f * c + i * z
    return o * np.tanh(c), c


@pytest.mark.parametrize("path", FILES, ids=lambda p: p.stem)
def test_julia_conventions_reproduce_the_outputs(path):
    """check_golden.jl's recipe, emulated: parameters as stored, sequences with their axes reversed,
    time along the second axis, the cell written column-wise as RecurrentLayers.jl writes it."""
    tensors, meta = load_case(path)
    W = {k: v.astype(np.float64) for k, v in case_params(tensors).items()}
    x = julia_reverse_axes(tensors["xs"].astype(np.float64))           # (I, T, B) or (I, T)
    h, c = (julia_reverse_axes(tensors[n].astype(np.float64)) for n in ("h0", "c0"))  # (H, B) or (H,)
    outputs = []
    for t in range(x.shape[1]):
        h, c = julia_cell(W, x[:, t], h, c, meta["integration_mode"])
        outputs.append(h)
    hs = np.stack(outputs, axis=1)                                      # (H, T, B) or (H, T)
    dtype = meta["dtype"]
    for name, value in (("hs", hs), ("h_T", h), ("c_T", c)):
        error, where = relative_error(value, julia_reverse_axes(tensors[name]))
        assert error <= tolerance(dtype), f"{path.name}:{name}[{where}] error {error:.3g}"


@pytest.mark.parametrize("path", FILES, ids=lambda p: p.stem)
def test_files_satisfy_safetensors_jl_reader(path):
    """What SafeTensors.jl's read_metadata/validate demand: a header length that fits, a JSON header
    whose __metadata__ maps strings to strings, dtypes it knows, and data offsets that start at 0, are
    contiguous in offset order, match each shape, and end exactly at the end of the file."""
    data = path.read_bytes()
    n = int.from_bytes(data[:8], "little")
    assert 8 + n <= len(data)
    header = json.loads(data[8:8 + n])
    meta = header.pop("__metadata__")
    assert all(isinstance(k, str) and isinstance(v, str) for k, v in meta.items())
    sizes = {"F32": 4, "F64": 8}
    start = 0
    for name, info in sorted(header.items(), key=lambda kv: kv[1]["data_offsets"]):
        begin, end = info["data_offsets"]
        assert begin == start and end - begin == int(np.prod(info["shape"], dtype=int)) * sizes[info["dtype"]], name
        start = end
    assert 8 + n + start == len(data)


# ---- what check_golden.jl expects of the files (parsed from its text; Julia cannot run here) ----

def julia_constant(name):
    """The text of ``const NAME = ...`` in check_golden.jl, up to its closing bracket."""
    script = JULIA_SCRIPT.read_text()
    match = re.search(rf"^const {name} = (\w*)\(", script, re.M)
    assert match, f"check_golden.jl defines no `const {name} = (...)`"
    depth, start = 0, match.end() - 1
    for end in range(start, len(script)):
        depth += {"(": 1, ")": -1}.get(script[end], 0)
        if depth == 0:
            return script[start:end + 1]
    raise AssertionError(f"const {name}: unbalanced brackets")


def julia_strings(name):
    return re.findall(r'"([^"]*)"', julia_constant(name))


def julia_pairs(name):
    pairs = re.findall(r'"([^"]*)"\s*=>\s*"([^"]*)"', julia_constant(name))
    assert len(pairs) * 2 == len(julia_strings(name)), f"const {name}: every entry should be a \"a\" => \"b\" pair"
    return dict(pairs)


def julia_pairs_numbers(name):
    return {k: float(v) for k, v in re.findall(r'"(\w+)"\s*=>\s*([0-9.e+-]+)', julia_constant(name))}


def julia_expected_tensors(meta):
    """The tensor names and NumPy-order shapes check_golden.jl's read_case demands of a file with this
    metadata: its SHAPES table (letters are metadata sizes, "B" only when batched), the parameters whose
    bias flag is on, and grad.<parameter> for each (shapes from the spec's canonical table, which is
    RecurrentLayers.jl's)."""
    batched = {"true": True, "false": False}[meta["batched"]]
    shapes = {}
    for name, spec in julia_pairs("SHAPES").items():
        shapes[name] = tuple(int(d) if d.isdigit() else int(meta[d]) for d in spec.split() if batched or d != "B")
    bias_flags = julia_pairs("BIAS_FLAGS")
    sizes = {"I": int(meta["I"]), "H": int(meta["H"])}
    for name in julia_strings("PARAMS"):
        if name in bias_flags and meta[bias_flags[name]] != "true":
            continue
        shape = mlstm_spec.PARAM_SHAPES[name]
        if name == "weight_hh" and meta["independent_recurrence"] == "true":
            shape = ("H",)
        concrete = tuple(int(d[:-1] or 1) * sizes[d[-1]] for d in shape)
        shapes[name] = shapes[f"grad.{name}"] = concrete
    return shapes


def test_julia_script_lists_exactly_the_golden_cases():
    listed = julia_strings("CASES")
    assert len(set(listed)) == len(listed), "check_golden.jl lists a case twice"
    assert sorted(listed) == [p.stem for p in FILES], (
        "check_golden.jl's CASES and tests/data/golden/*.safetensors differ: "
        f"only in the script {sorted(set(listed) - {p.stem for p in FILES})}, "
        f"only in the files {sorted({p.stem for p in FILES} - set(listed))}")
    assert sorted(listed) == sorted(case.name for case in golden.cases())


@pytest.mark.parametrize("path", FILES, ids=lambda p: p.stem)
def test_files_hold_exactly_the_tensors_and_shapes_the_julia_script_reads(path):
    tensors, meta = load_case(path)
    expected = julia_expected_tensors(meta)
    assert sorted(tensors) == sorted(expected), (
        f"{path.name}: only in the file {sorted(set(tensors) - set(expected))}, "
        f"only in check_golden.jl's expectation {sorted(set(expected) - set(tensors))}")
    for name, shape in expected.items():
        assert tensors[name].shape == shape, f"{path.name}:{name} has shape {tensors[name].shape}, the script expects {shape}"


@pytest.mark.parametrize("path", FILES, ids=lambda p: p.stem)
def test_files_hold_the_metadata_the_julia_script_reads(path):
    _, meta = load_case(path)
    keys = julia_strings("META_KEYS")
    assert set(keys) <= set(meta), f"{path.name} lacks {sorted(set(keys) - set(meta))}"
    assert tuple(julia_strings("FORMAT")) == (meta["format"], meta["format_version"])
    assert meta["case"] == path.stem
    for key in ("batched", "bias", "recurrent_bias", "multiplicative_bias", "independent_recurrence"):
        assert meta[key] in ("true", "false"), (key, meta[key])  # what Julia's parse(Bool, ...) reads
    for key in ("I", "H", "T", "B"):
        assert re.fullmatch(r"[1-9][0-9]*", meta[key]), (key, meta[key])  # what parse(Int, ...) reads
    assert meta["dtype"] in julia_pairs_numbers("TOLERANCE")
    assert meta["integration_mode"] in mlstm_spec.INTEGRATION_MODES  # RecurrentLayers.jl's two symbols


def test_julia_script_reads_only_declared_names():
    """Every metadata key and tensor name the script's code uses is one that the tables above declare
    (so the checks of those tables cover everything the script reads)."""
    script = JULIA_SCRIPT.read_text()
    used_keys = set(re.findall(r'meta\["(\w+)"\]', script)) | set(re.findall(r'flag\(meta, "(\w+)"\)', script))
    assert used_keys <= set(julia_strings("META_KEYS")), sorted(used_keys - set(julia_strings("META_KEYS")))
    used_tensors = set(re.findall(r'tensors\["([\w.]+)"\]', script)) | set(re.findall(r'expected\("([\w.]+)"\)', script))
    declared = set(julia_pairs("SHAPES"))
    assert used_tensors and used_tensors <= declared, sorted(used_tensors - declared)
    assert julia_pairs("BIAS_FLAGS") == mlstm_spec.BIAS_FLAGS


def test_julia_script_uses_the_project_tolerances_and_names():
    assert julia_pairs_numbers("TOLERANCE") == {d: TOLERANCES[(d, "cpu")] for d in ("float32", "float64")}
    script = JULIA_SCRIPT.read_text()
    assert float(re.search(r"const FLOOR = ([0-9.e-]+)", script).group(1)) == FLOOR
    assert tuple(julia_strings("PARAMS")) == PARAM_NAMES == tuple(mlstm_spec.PARAM_SHAPES)


def test_julia_project_pins_the_versions_the_docs_say_were_checked():
    project = (JULIA_SCRIPT.parent / "Project.toml").read_text()
    compat = dict(re.findall(r'^(\w+) = "([^"]*)"$', project.split("[compat]", 1)[1], re.M))
    for package in ("Flux", "RecurrentLayers", "SafeTensors"):
        assert re.search(rf"^{package} = \"[0-9a-f-]{{36}}\"$", project, re.M), package
    # The dense_proj replacement is written against 0.3.4's method: nothing else may resolve.
    assert compat["RecurrentLayers"] == "=0.3.4"
    docs = [" ".join(re.sub(r"^#", "", text, flags=re.M).split()) for text in (
        (JULIA_SCRIPT.parent / "README.md").read_text(), (ROOT / "docs" / "interop.md").read_text(),
        JULIA_SCRIPT.read_text())]
    for package in ("Flux", "SafeTensors"):
        low, high = re.fullmatch(r"(\d+\.\d+\.\d+) - (\d+\.\d+\.\d+)", compat[package]).groups()
        for text in docs:
            assert re.search(rf"{package}(\.jl)? {re.escape(low)} (and|to) {re.escape(high)}", text), (package, low, high)
    for text in docs:
        assert "RecurrentLayers.jl 0.3.4" in text and re.search("sources, not run", text, re.I), text[:200]
