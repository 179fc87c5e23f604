"""`sandbox floats`: stored values, bit fields and flags vs independent arithmetic."""

import math

import numpy as np
import pytest

from sandbox.cli import main
from sandbox.errors import UserError
from sandbox.teaching import floats
from sandbox.teaching.formats import DEFAULT_FORMATS, FORMATS, get_format, parse_formats


def round_to_bits(value: float, significant_bits: int) -> float:
    """Round-to-nearest-even to `significant_bits` (normal range only), by hand."""
    spacing = 2.0 ** (math.floor(math.log2(abs(value))) - (significant_bits - 1))
    return round(value / spacing) * spacing  # Python's round() ties to even


def rows_by_format(value):
    return {r.format: r for r in floats.analyze_all([value], [FORMATS[n] for n in DEFAULT_FORMATS])}


def test_70000_overflows_fp16_is_nan_in_e4m3_and_finite_in_bf16():
    rows = rows_by_format(70000)
    assert rows["fp16"].stored == math.inf and rows["fp16"].overflow
    assert math.isnan(rows["e4m3"].stored) and rows["e4m3"].overflow
    assert rows["e5m2"].stored == math.inf and rows["e5m2"].overflow
    assert rows["bf16"].stored == round_to_bits(70000, 8) == 70144 and not rows["bf16"].overflow
    assert rows["bf16"].rel_error == pytest.approx(144 / 70000)
    assert rows["fp32"].stored == 70000 and rows["fp32"].rel_error == 0
    # What a saturating quantizer stores instead: the format's max.
    assert (rows["fp16"].saturated, rows["e4m3"].saturated, rows["e5m2"].saturated) == (65504, 448, 57344)
    assert rows["fp32"].saturated is None and rows["bf16"].saturated is None
    assert "overflow -> NaN (no inf)" in rows["e4m3"].flags and "overflow -> inf" in rows["fp16"].flags


def test_pi_ish_rounding():
    rows = rows_by_format(3.14)
    assert rows["bf16"].stored == round_to_bits(3.14, 8) == 3.140625
    assert rows["fp16"].stored == round_to_bits(3.14, 11)
    assert rows["e4m3"].stored == round_to_bits(3.14, 4) == 3.25
    assert rows["fp32"].stored == float(np.float32(3.14))
    assert rows["bf16"].rel_error == pytest.approx(abs(3.140625 - 3.14) / 3.14)
    assert not any(r.flags for r in rows.values())


def test_1e38_and_1e_minus_8():
    big = rows_by_format(1e38)
    assert math.isfinite(big["bf16"].stored) and math.isfinite(big["fp32"].stored)
    assert big["bf16"].stored == pytest.approx(1e38, rel=2**-8)
    assert big["fp16"].stored == math.inf
    small = rows_by_format(1e-8)
    assert 1e-8 < 2.0**-25  # below half fp16's smallest subnormal 2^-24
    assert small["fp16"].stored == 0 and small["fp16"].underflow and small["fp16"].rel_error == 1
    assert small["bf16"].stored == pytest.approx(1e-8, rel=2**-8) and not small["bf16"].underflow


def test_subnormal_flag():
    row = floats.analyze(1e-7, get_format("fp16"))  # between 2^-24 and 2^-14
    assert row.subnormal and not row.underflow and row.exponent == "00000"
    assert row.stored == round(1e-7 / 2**-24) * 2**-24  # subnormals are multiples of 2^-24
    assert not floats.analyze(1e-7, get_format("fp32")).subnormal


@pytest.mark.parametrize("name", DEFAULT_FORMATS)
@pytest.mark.parametrize("value", [3.14, -70000.0, 1e-3, 0.1])
def test_bit_fields_decode_to_stored_value(name, value):
    fmt = get_format(name)
    row = floats.analyze(value, fmt)
    if not math.isfinite(row.stored) or row.subnormal or row.stored == 0:
        pytest.skip("decoding formula is for normal numbers")
    assert len(row.sign + row.exponent + row.mantissa) == fmt.bits
    exponent = int(row.exponent, 2) - (2 ** (fmt.exponent_bits - 1) - 1)  # IEEE-style bias
    decoded = (-1) ** int(row.sign) * 2.0**exponent * (1 + int(row.mantissa, 2) / 2**fmt.mantissa_bits)
    assert decoded == row.stored


def test_fp16_bits_match_numpy_view():
    row = floats.analyze(3.14, get_format("fp16"))
    assert row.sign + row.exponent + row.mantissa == format(int(np.float16(3.14).view(np.uint16)), "016b")


def test_format_properties_match_their_definitions():
    fp16, bf16, e4m3, e5m2 = (get_format(n) for n in ("fp16", "bf16", "e4m3", "e5m2"))
    assert fp16.max == (2 - 2**-10) * 2**15 == 65504
    assert e4m3.max == 1.75 * 2**8 == 448  # top mantissa pattern is NaN, so 1.110b
    assert e5m2.max == 1.75 * 2**15 == 57344
    assert bf16.epsilon == 2**-7 == 0.0078125
    assert fp16.smallest_subnormal == 2**-24 and fp16.smallest_normal == 2**-14
    assert (e4m3.bits, e4m3.exponent_bits, e4m3.mantissa_bits) == (8, 4, 3)
    assert (bf16.bits, bf16.exponent_bits, bf16.mantissa_bits, bf16.exponent_bias) == (16, 8, 7, 127)
    assert not e4m3.has_inf and all(f.has_inf for n, f in FORMATS.items() if n != "e4m3")
    assert math.isnan(float(e4m3.saturating_cast(np.nan)))
    assert float(e4m3.saturating_cast(-1e9)) == -448


def test_parse_formats_and_errors():
    assert [f.name for f in parse_formats("fp32, BF16")] == ["fp32", "bf16"]
    with pytest.raises(UserError, match="unknown format 'fp7'"):
        parse_formats("fp32,fp7")


def test_cli_values(capsys):
    assert main(["floats", "70000", "3.14", "1e38", "1e-8"]) == 0
    out = capsys.readouterr().out
    for text in ("70144", "3.140625", "inf", "nan", "overflow -> NaN (no inf)", "underflow -> 0", "saturating cast: 448"):
        assert text in out
    assert "E4M3FN has no inf" in out


def test_cli_table(capsys):
    assert main(["floats", "--table"]) == 0
    out = capsys.readouterr().out
    for text in ("65504", "448", "57344", "0.0078125 = 2^-7", "5.960464477539063e-08 = 2^-24", "float8_e4m3fn"):
        assert text in out


def test_cli_table_rows_fit_100_columns(capsys):
    assert main(["floats", "--table"]) == 0
    rows = [line for line in capsys.readouterr().out.splitlines() if line.startswith(("│", "┃", "┏", "└"))]
    assert rows and max(len(line) for line in rows) <= 100, max(len(line) for line in rows)


def test_cli_formats_option_limits_rows(capsys):
    assert main(["floats", "1.5", "--formats", "e5m2"]) == 0
    out = capsys.readouterr().out
    assert "e5m2" in out and "bf16" not in out


@pytest.mark.parametrize(
    "argv, needle",
    [(["floats", "abc"], "'abc'"), (["floats", "1", "--formats", "fp32,fp7"], "'fp7'"), (["floats"], "VALUE")],
)
def test_cli_bad_input_exits_2_with_one_line(capsys, argv, needle):
    assert main(argv) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err.count("\n") == 1 and needle in captured.err
