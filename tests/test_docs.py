"""docs/equations.md against the code: the tables there must state the constants the code uses
(block orders, parameter shapes, bias options, integration modes) and the shapes ``forward`` and
``backward`` really take and return, so the page and the code cannot drift apart."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest

import mlstm_spec
from mlstm_spec import equations

DOC = Path(__file__).resolve().parents[1] / "docs" / "equations.md"


def markdown_tables(text):
    """Every table in ``text`` as a list of rows (header first), cells stripped of spaces and backticks."""
    tables, current = [], []
    for line in text.splitlines() + [""]:
        if line.startswith("|"):
            cells = [cell.strip().strip("`").strip() for cell in line.strip().strip("|").split("|")]
            if not all(re.fullmatch(r":?-+:?", cell) for cell in cells):  # skip the |---| rule
                current.append(cells)
        elif current:
            tables.append(current)
            current = []
    return tables


def table(header_start):
    """The one table whose header begins with ``header_start``, as a list of dicts."""
    found = [t for t in markdown_tables(DOC.read_text()) if t[0][:len(header_start)] == header_start]
    assert len(found) == 1, f"docs/equations.md should have one table headed {header_start}, has {len(found)}"
    header, *rows = found[0]
    return [dict(zip(header, row)) for row in rows]


def parse_shape(text):
    """'(5H, I)' -> ('5H', 'I'); '(H,)' -> ('H',)."""
    match = re.fullmatch(r"\((.*)\)", text)
    assert match, f"{text!r} is not a shape"
    return tuple(part.strip() for part in match.group(1).split(",") if part.strip())


def parse_blocks(text):
    return None if text in ("-", "") else tuple(part.strip() for part in text.split(","))


def blocks_of(shape):
    """The code's block order for a parameter, from its leading dimension: '5H' -> IH_BLOCKS."""
    by_count = {f"{len(equations.IH_BLOCKS)}H": equations.IH_BLOCKS,
                f"{len(equations.MH_BLOCKS)}H": equations.MH_BLOCKS}
    return by_count.get(shape[0])


def test_parameter_table_states_the_codes_shapes_blocks_and_options():
    rows = {row["name"]: row for row in table(["name", "shape", "blocks", "option"])}
    assert set(rows) == set(equations.PARAM_SHAPES)
    for name, shape in equations.PARAM_SHAPES.items():
        row = rows[name]
        assert parse_shape(row["shape"]) == shape, f"{name}: doc says {row['shape']}, code {shape}"
        assert parse_blocks(row["blocks"]) == blocks_of(shape), (
            f"{name}: doc says blocks {row['blocks']}, code {blocks_of(shape)}")
        option = equations.BIAS_FLAGS.get(name, "always")
        assert row["option"] == option, f"{name}: doc says option {row['option']}, code {option}"
    assert "`(H,)`" in rows["weight_hh"]["role"] and "independent_recurrence" in rows["weight_hh"]["role"]


def test_block_row_table_matches_the_block_orders():
    def rows_text(k):
        start = "0" if k == 0 else ("H" if k == 1 else f"{k}H")
        stop = "H" if k == 0 else f"{k + 1}H"
        return f"{start}:{stop}"

    rows = table(["block"])
    assert [row["block"] for row in rows] == list(equations.IH_BLOCKS)
    for row in rows:
        gate = row["block"]
        ih, mh = list(row.values())[1:3]
        assert ih == rows_text(equations.IH_BLOCKS.index(gate)), f"block {gate} in weight_ih"
        expected_mh = rows_text(equations.MH_BLOCKS.index(gate)) if gate in equations.MH_BLOCKS else "-"
        assert mh == expected_mh, f"block {gate} in weight_mh"


def test_integration_mode_table_lists_the_codes_modes():
    modes = [row["integration_mode"].split()[0].strip("`") for row in table(["integration_mode"])]
    assert tuple(modes) == equations.INTEGRATION_MODES
    default = [row["integration_mode"] for row in table(["integration_mode"]) if "default" in
               row["integration_mode"]]
    assert len(default) == 1 and default[0].startswith("addition")


SIZES = {"B": 2, "T": 3, "I": 4, "H": 5}


def concrete(shape_text):
    return tuple(SIZES[d] for d in parse_shape(shape_text))


def test_shape_table_matches_what_forward_cell_and_backward_do():
    rows = {row["value"].replace("`", "").split()[0]: row for row in table(["value", "batched", "unbatched"])}
    params = mlstm_spec.init_params(SIZES["I"], SIZES["H"], rng=0, dtype=np.float64)
    for batched in ("batched", "unbatched"):
        xs = np.ones(concrete(rows["xs"][batched]))
        state_shape = concrete(rows["state"][batched])
        state = (np.zeros(state_shape), np.zeros(state_shape))
        hs, (h_T, c_T) = mlstm_spec.forward(params, xs, state)
        assert hs.shape == concrete(rows["hs"][batched])
        assert h_T.shape == c_T.shape == concrete(rows["final"][batched])
        x = np.ones(concrete(rows["x"][batched]))
        h, (_, c) = mlstm_spec.cell(params, x, state)
        assert h.shape == c.shape == state_shape
        d_hs = np.ones(concrete(rows["d_hs"][batched]))
        d_state_shape = concrete(rows["d_state"][batched])
        grads = mlstm_spec.backward(params, xs, state, d_hs, (np.ones(d_state_shape),) * 2)
        assert grads["x"].shape == xs.shape and grads["h0"].shape == state_shape


@pytest.mark.parametrize("name, projection", [("bias_ih", "p"), ("bias_hh", "r"), ("bias_mh", "q")])
def test_every_bias_appears_in_the_equations(name, projection):
    symbol = "b_{" + name.split("_")[1] + "}"
    step = DOC.read_text().split("## One step")[1].split("### Glossary")[0]
    line = [ln for ln in step.splitlines() if re.match(rf"\s*{projection}\s+&=", ln)]
    assert len(line) == 1 and symbol in line[0], f"the equation of {projection} should add {symbol}"


def test_the_equations_module_docstring_states_the_same_block_orders():
    doc = equations.__doc__
    assert "blocks  " + ", ".join(equations.IH_BLOCKS) in doc
    assert "blocks  " + ", ".join(equations.MH_BLOCKS) in doc
