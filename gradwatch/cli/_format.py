"""Output formatting for the CLI: aligned tables, JSON with stable keys, numbers, sparklines.

One rule for every command: a value that was not measured is missing ('-' in a table, `null`
in JSON); NaN, +Inf and -Inf are values, shown as `nan`, `inf` and `-inf` (JSON strings, since
JSON has no such numbers). `nonfinite_text` is the only place that spells them. Counts are
integers everywhere (`typed`), so a table's `6` is JSON's `6`, never `6.0`.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import click

BARS = "▁▂▃▄▅▆▇█"
#: Metrics whose values count something (params, outputs) or flag a step (0/1): stored as floats
#: like every value, shown and written as integers.
COUNT_METRICS = frozenset({"skipped", "nonfinite_params", "overflow_params", "act_nonfinite"})


def nonfinite_text(x: float) -> str:
    """How every output spells a non-finite value: 'nan', 'inf' or '-inf'."""
    return "nan" if math.isnan(x) else "inf" if x > 0 else "-inf"


def num(x: Any, digits: int = 3) -> str:
    """A number for a table cell: `digits` significant digits; '-' when missing (None), 'nan' /
    'inf' / '-inf' for those values."""
    if x is None:
        return "-"
    if hasattr(x, "dtype") and hasattr(x, "item"):  # numpy scalars
        x = x.item()
    if isinstance(x, bool):
        return "yes" if x else "no"
    if isinstance(x, int):
        return str(x)
    if isinstance(x, float):
        return f"{x:.{digits}g}" if math.isfinite(x) else nonfinite_text(x)
    return str(x)


def typed(metric: str, value: Any) -> Any:
    """A stored value as what it is: an int for a count metric (`COUNT_METRICS`), else as it is;
    None (not measured), NaN and ±Inf stay as they are."""
    if metric in COUNT_METRICS and isinstance(value, float) and math.isfinite(value):
        return int(value)
    return value


def typed_list(metric: str, values: Any) -> list[Any]:
    """`typed` over a sequence (a numpy array of a series' values)."""
    return [typed(metric, v) for v in (values.tolist() if hasattr(values, "tolist") else values)]


def factor(ratio: float | None) -> str:
    """A ratio B/A in words: '×2.68e7 larger', '×1.5 smaller', 'same' (within 0.5%); '-' when missing."""
    if ratio is None or not math.isfinite(ratio):
        return "-" if ratio is None else nonfinite_text(ratio)
    if ratio <= 0:
        return "B is 0" if ratio == 0 else "-"
    if abs(math.log(ratio)) < math.log(1.005):
        return "same"
    big = ratio if ratio > 1 else 1 / ratio
    return f"×{compact(big)} {'larger' if ratio > 1 else 'smaller'}"


def compact(x: float, digits: int = 3) -> str:
    """A positive number with `digits` significant digits (a whole number from 100 to 1e4), a short
    exponent from 1e4 on: 1.5, 812, 5183, 2.68e7."""
    if x < 100:
        return f"{x:.{digits}g}"
    if x < 1e4:
        return f"{x:.0f}"
    mantissa, exp = f"{x:.{digits - 1}e}".split("e")
    return f"{mantissa.rstrip('0').rstrip('.')}e{int(exp)}"


def pct(x: float | None) -> str:
    """A ratio as a percentage cell: '-' when missing (None), 'nan' / 'inf' for those values."""
    if x is None:
        return "-"
    return f"{100 * x:.0f}%" if math.isfinite(x) else nonfinite_text(float(x))


def duration(seconds: float | None) -> str:
    """A duration as 1h02m, 3m05s or 12.3s."""
    if seconds is None or not math.isfinite(seconds):
        return "-"
    if seconds < 60:
        return f"{seconds:.1f}s"
    m, s = divmod(int(round(seconds)), 60)
    h, m = divmod(m, 60)
    return f"{h}h{m:02d}m" if h else f"{m}m{s:02d}s"


def when(ts: float | None) -> str:
    """A unix time as local 'YYYY-mm-dd HH:MM:SS'."""
    return "-" if ts is None else time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(ts))


def printable(text: str) -> str:
    """`text` with every non-printable character escaped (a newline as \\n, NUL as \\x00, a lone
    surrogate as \\udc80), so that a run name cannot split a table row or break the terminal."""
    if text.isprintable():
        return text
    return "".join(c if c.isprintable() else c.encode("unicode_escape", "backslashreplace").decode("ascii")
                   for c in text)


def table(headers: Sequence[str], rows: Iterable[Sequence[Any]], right: Iterable[int] = ()) -> str:
    """Rows as an aligned text table; cells are str()-ed and escaped (`printable`), columns in
    `right` right-aligned."""
    cells = [[printable(str(c)) for c in row] for row in rows]
    widths = [max([len(h)] + [len(r[i]) for r in cells]) for i, h in enumerate(headers)]
    right = set(right)

    def line(row: Sequence[str]) -> str:
        return "  ".join(c.rjust(w) if i in right else c.ljust(w) for i, (c, w) in enumerate(zip(row, widths))).rstrip()

    return "\n".join([line(list(headers))] + [line(r) for r in cells])


def jsonable(obj: Any) -> Any:
    """Plain JSON values: NaN, +Inf and -Inf become the strings "nan", "inf" and "-inf" (None,
    "not measured", stays null), numpy scalars and arrays become numbers and lists, tuples lists."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else nonfinite_text(obj)
    if isinstance(obj, dict):
        return {str(k): jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [jsonable(v) for v in obj]
    if hasattr(obj, "tolist"):  # numpy scalars and arrays
        return jsonable(obj.tolist())
    return obj


def dumps(obj: Any, indent: int | None = 2) -> str:
    """Strict JSON text for `obj` (see `jsonable`)."""
    return json.dumps(jsonable(obj), indent=indent, allow_nan=False)


def emit(obj: Any, as_json: bool, render: Callable[[Any], str]) -> None:
    """Print `obj` as JSON when `as_json`, else as `render(obj)` with every string in it escaped
    (`printable`): a run or layer name cannot break the text it is printed in."""
    click.echo(dumps(obj) if as_json else render(_escaped(obj)))


def _escaped(obj: Any) -> Any:
    """`obj` with `printable` applied to every string of its dicts, lists and tuples."""
    if isinstance(obj, str):
        return printable(obj)
    if isinstance(obj, dict):
        return {k: _escaped(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_escaped(v) for v in obj]
    if type(obj) is tuple:
        return tuple(_escaped(v) for v in obj)
    return obj


def sparkline(values: Sequence[float], width: int = 60, log: bool | None = None) -> str:
    """A one-line chart of `values`, resampled to `width` buckets (each bucket shows its max).

    `log` (default: when every finite value is positive and they span over 100x) scales
    logarithmically. Non-finite values show as '!'.
    """
    vals = [float(v) for v in values]
    if not vals:
        return ""
    n = len(vals)
    width = max(1, min(width, n))
    buckets = [vals[i * n // width:(i + 1) * n // width] for i in range(width)]
    finite = [v for v in vals if math.isfinite(v)]
    if log is None:
        log = bool(finite) and min(finite) > 0 and max(finite) > 100 * min(finite)
    scale = (lambda v: math.log10(v)) if log else (lambda v: v)
    scaled = [scale(v) for v in finite if not log or v > 0]
    lo, hi = (min(scaled), max(scaled)) if scaled else (0.0, 0.0)
    out = []
    for bucket in buckets:
        if any(not math.isfinite(v) for v in bucket):
            out.append("!")
            continue
        v = scale(max(bucket)) if not log or max(bucket) > 0 else lo
        k = 0 if hi == lo else int(round((v - lo) / (hi - lo) * (len(BARS) - 1)))
        out.append(BARS[k])
    return "".join(out)
