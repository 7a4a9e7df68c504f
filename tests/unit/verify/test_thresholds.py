"""qexport/verify/thresholds.py as plain functions: overrides parsed, checked and applied (no model; milliseconds).

Written for mutation testing (bench/MUTATION.md): each test states one rule a user of `--threshold` relies on.
"""

from __future__ import annotations

import math

import pytest

from qexport.errors import InputError
from qexport.verify.thresholds import DEFAULTS, REGRESSIONS, Regression, Thresholds, parse_overrides, threshold_value, \
    thresholds_for


@pytest.mark.parametrize("text,value", [("0.05", 0.05), (" 1e-3 ", 1e-3), ("-2", -2.0), (3, 3.0), (0.5, 0.5)])
def test_threshold_value_reads_numbers_as_floats(text, value):
    got = threshold_value(text, "here")
    assert got == value and type(got) is float


@pytest.mark.parametrize("text", [None, "none", "None", " NONE "])
def test_threshold_value_none_disables_the_bound(text):
    assert threshold_value(text, "here") is None


@pytest.mark.parametrize("text", ["x", "", "1,5", True, False, [1]])
def test_threshold_value_refuses_what_is_not_a_number_naming_where_and_what(text):
    with pytest.raises(InputError) as e:
        threshold_value(text, "--threshold: 'min_top1=?'")
    assert str(e.value) == f"--threshold: 'min_top1=?': {text!r} is not a number (or 'none')"


@pytest.mark.parametrize("text", ["nan", "inf", "-inf", math.inf, math.nan])
def test_threshold_value_refuses_nan_and_infinity_pointing_at_none(text):
    with pytest.raises(InputError) as e:
        threshold_value(text, "where")
    assert str(e.value) == f"where: {text!r} is not a finite number (use 'none' to disable a threshold)"


def test_parse_overrides_reads_every_item_and_none():
    assert parse_overrides(["max_kld_mean=0.05", " min_top1 =none", "min-sqnr-db=12"]) == {
        "max_kld_mean": 0.05, "min_top1": None, "min_sqnr_db": 12.0}
    assert parse_overrides([]) == {}


@pytest.mark.parametrize("item", ["min_top1", "=0.5", "min_top2=0.5"])
def test_parse_overrides_refuses_items_that_are_not_a_known_name_and_a_value(item):
    with pytest.raises(InputError, match=rf"^--threshold: {item!r} is not NAME=VALUE with NAME one of "):
        parse_overrides([item])


def test_parse_overrides_names_the_item_when_its_value_is_bad():
    with pytest.raises(InputError) as e:
        parse_overrides(["min_top1=0.9", "max_kld_p99=lots"], option="--opt")
    assert str(e.value) == "--opt: 'max_kld_p99=lots': 'lots' is not a number (or 'none')"


def test_with_overrides_replaces_only_the_named_fields_and_checks_their_values():
    base = DEFAULTS["int8"]
    new = base.with_overrides({"min_top1": "0.5", "max_kld_mean": None})
    assert (new.min_top1, new.max_kld_mean) == (0.5, None)
    assert {k: v for k, v in vars(new).items() if k not in ("min_top1", "max_kld_mean")} == \
        {k: v for k, v in vars(base).items() if k not in ("min_top1", "max_kld_mean")}
    assert base.min_top1 == 0.90  # the defaults are not modified
    with pytest.raises(InputError, match=r"^threshold min_top1: 'x' is not a number"):
        base.with_overrides({"min_top1": "x"})


def test_with_overrides_refuses_an_unknown_name_listing_the_known_ones():
    with pytest.raises(InputError) as e:
        Thresholds().with_overrides({"min_top1": 0.5, "bogus": 1})
    known = ", ".join(sorted(vars(Thresholds())))
    assert str(e.value) == f"--threshold: unknown threshold 'bogus' (known: {known})"


def test_thresholds_for_applies_overrides_to_the_formats_defaults():
    assert thresholds_for("int4") is DEFAULTS["int4"]
    assert thresholds_for("int4", {}) == DEFAULTS["int4"]
    got = thresholds_for("int4", {"min_sqnr_db": 10.0})
    assert got.min_sqnr_db == 10.0 and got.min_cosine == DEFAULTS["int4"].min_cosine


@pytest.mark.parametrize("baseline", [0.0, 2.0, -2.0])
def test_regression_allowance_adds_relative_tolerance_of_the_baselines_magnitude(baseline):
    assert Regression(higher_is_better=False, abs_tol=0.5, rel_tol=0.25).allowed(baseline) == 0.5 + 0.25 * abs(baseline)
    assert Regression(higher_is_better=True, abs_tol=0.5).allowed(baseline) == 0.5  # no relative part by default


def test_every_regression_metric_allows_a_non_negative_move():
    assert all(r.allowed(1.0) >= 0 for r in REGRESSIONS.values())
