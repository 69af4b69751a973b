"""The table of parameters: each value named once, and the stand-in, the planner and a plan all read it from there."""

from __future__ import annotations

import dataclasses

import pytest

from lib.planner.cli import build_arg_parser as planner_parser
from lib.planner.model import Plan
from lib.standin.autoscaler import build_arg_parser as standin_parser
from lib.standin.params import BY_NAME, ENDPOINT, PARAMS, flag_value
from lib.standin.scaling import EndpointParams


def test_every_row_is_a_value_of_a_plan_with_the_rows_default():
    """A default plan holds each row's default under the row's name, in its parameters, its policy or itself."""
    plan = Plan()
    for param in PARAMS:
        assert plan.value(param.name) == param.default, param.name


def test_the_endpoint_rows_are_exactly_the_endpoint_parameters_under_vasts_names():
    """Each field of EndpointParams has a row with Vast's name, and only they do."""
    assert {param.name for param in ENDPOINT} == {f.name for f in dataclasses.fields(EndpointParams)}
    assert all(param.vast == param.name for param in ENDPOINT)


def test_the_stand_in_and_the_planner_take_each_endpoint_parameter_by_the_same_flag_and_default():
    """With no flags, both read each endpoint parameter's default; the planner as a one-value comma list."""
    standin = standin_parser().parse_args([])
    planner = planner_parser().parse_args([])
    for param in ENDPOINT:
        assert getattr(standin, param.name) == param.default, param.flag
    for param in PARAMS:
        assert getattr(planner, param.name) == [param.default], param.flag
    both = [BY_NAME["scale_down_delay"], BY_NAME["route_hold"]]
    args = standin_parser().parse_args([arg for p in both for arg in (p.flag, "2")])
    assert [getattr(args, p.name) for p in both] == [2.0, 2.0]


def test_a_plans_json_holds_every_row_then_the_measured_cold_starts():
    """Plan.as_dict has one key per row, in the table's order, and the spans as the flags take them."""
    plan = Plan.of({"cold_start": (10.0, 20.0), "min_load": 100.0}, cold_start_each=(3.0,))
    shown = plan.as_dict()
    assert list(shown) == [*(param.name for param in PARAMS), "cold_start_each"]
    assert shown["cold_start"] == shown["resume"] == [10.0, 20.0] and flag_value(shown["cold_start"]) == "10:20"
    assert shown["min_load"] == 100.0 and shown["cold_start_each"] == [3.0]


def test_a_plan_of_a_name_the_table_does_not_have_is_refused():
    """A misspelt value does not vanish into a default."""
    with pytest.raises(ValueError, match="no parameter named min_lod"):
        Plan.of({"min_lod": 100.0})
