"""docs/equations.md's section on the variants against the code, as tests/test_docs.py does for the
rest of the page: the tables of variant parameters and run-time options must state the shapes,
options and defaults that mlstm_spec uses, and the step's equations must carry every term."""

from __future__ import annotations

import inspect

import mlstm_spec
from mlstm_spec import equations
from test_docs import DOC, parse_shape, table


def test_variant_parameter_table_states_the_codes_shapes_and_options():
    rows = {row["variant parameter"]: row for row in table(["variant parameter", "shape", "option"])}
    assert set(rows) == set(equations.VARIANT_PARAM_SHAPES)
    for name, shape in equations.VARIANT_PARAM_SHAPES.items():
        assert parse_shape(rows[name]["shape"]) == shape, f"{name}: doc {rows[name]['shape']}, code {shape}"
        assert rows[name]["option"] == equations.VARIANT_FLAGS[name], name
    assert "`weight_hh` is `(H, P)" in rows["weight_hr"]["role"], "the doc should say weight_hh becomes (H, P)"
    init = inspect.signature(mlstm_spec.init_params).parameters
    assert init["proj_size"].default == 0 and init["peepholes"].default is False


def test_run_time_option_table_states_the_defaults_of_every_function():
    rows = {row["run-time option"]: row for row in table(["run-time option", "default"])}
    assert list(rows) == list(equations.RUNTIME_DEFAULTS)
    for name, default in equations.RUNTIME_DEFAULTS.items():
        assert rows[name]["default"] == repr(default), f"{name}: doc {rows[name]['default']}, code {default!r}"
        for function in (mlstm_spec.forward, mlstm_spec.cell, mlstm_spec.backward):
            parameter = inspect.signature(function).parameters[name]
            assert parameter.kind is parameter.KEYWORD_ONLY and parameter.default == default, (
                f"{function.__name__}({name}=...)")


def test_the_variant_step_carries_every_term():
    section = DOC.read_text().split("### One step with every variant")[1].split("| variant parameter")[0]
    lines = {symbol: [ln for ln in section.splitlines() if ln.lstrip().startswith(symbol)]
             for symbol in ("i_t", "f_t", "c_t", "o_t", "h_t")}
    assert r"w_{ci} \odot c_{t-1}" in lines["i_t"][0]
    assert r"w_{cf} \odot c_{t-1}" in lines["f_t"][0] and r"\beta" in lines["f_t"][0]
    assert r"\kappa_c" in lines["c_t"][0]
    assert r"w_{co} \odot c_t" in lines["o_t"][0], "o's peephole reads the new (clipped) cell state"
    assert "W_{hr}" in lines["h_t"][0] and r"\kappa_h" in lines["h_t"][0]
