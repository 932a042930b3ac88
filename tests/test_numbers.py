"""core.numbers: every numeric option refuses NaN, infinities, huge digit strings and out-of-range values."""

import argparse

import pytest

from core.numbers import check_number, number, parse_number, positive_float, seed


@pytest.mark.parametrize("text", ["nan", "NaN", "inf", "-inf", "+Infinity", "1e999", "", "abc", "1" * 5000])
def test_non_finite_and_garbage_floats_are_refused(text):
    with pytest.raises(ValueError, match="must be a finite number"):
        parse_number(text)


@pytest.mark.parametrize("text", ["1.5", "1e20", "nan", "1" * 5000, "0x10", "1_000"])
def test_integers_are_plain_decimal(text):
    with pytest.raises(ValueError, match="must be an integer"):
        parse_number(text, int)


def test_ranges_are_inclusive_unless_open():
    assert parse_number("0", float, low=0) == 0.0
    with pytest.raises(ValueError, match="> 0"):
        parse_number("0", float, low=0, low_open=True)
    assert parse_number("7", int, low=1, high=7) == 7
    with pytest.raises(ValueError, match="<= 7"):
        parse_number("8", int, low=1, high=7)


def test_argparse_names_the_flag_in_one_line(capsys):
    p = argparse.ArgumentParser(prog="tool")
    p.add_argument("--lr", type=positive_float)
    p.add_argument("--seed", type=seed)
    with pytest.raises(SystemExit) as e:
        p.parse_args(["--lr", "nan"])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err == "tool: error: argument --lr: must be a finite number > 0, got 'nan'"
    with pytest.raises(SystemExit):
        p.parse_args(["--seed", "-1"])
    assert "argument --seed: must be an integer >= 0" in capsys.readouterr().err
    assert p.parse_args(["--lr", "2e-3", "--seed", "42"]).lr == 2e-3


def test_check_number_on_values_that_did_not_come_from_text():
    assert check_number(float("nan")) is not None
    assert check_number(True, int) is not None
    assert check_number(3.0, int) is not None
    assert check_number(10**400, int, low=0) is None
    assert check_number(10**400, int, high=10**9) is not None
    assert check_number(0.5, float, low=0, high=1) is None
    assert number(int, low=1)("3") == 3
