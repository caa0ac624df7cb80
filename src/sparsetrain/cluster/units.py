"""Parse the rates and durations of tc's vocabulary: ``1gbit``, ``100mbit``, ``100us``, ``2ms``."""

from __future__ import annotations

import math
import numbers
import re
from typing import Any

# tc's units: "bit" suffixes are bits per second, "bps" suffixes bytes per second (SI powers).
_RATE_UNITS = {
    "bit": 1.0,
    "kbit": 1e3,
    "mbit": 1e6,
    "gbit": 1e9,
    "tbit": 1e12,
}
# tc's bytes-per-second units, refused: "10gbps" is 80 Gbit/s to tc, 10 Gbit/s to most readers.
_BYTE_RATE_UNITS = {"bps": 8.0, "kbps": 8e3, "mbps": 8e6, "gbps": 8e9, "tbps": 8e12}
_TIME_UNITS = {"s": 1.0, "sec": 1.0, "ms": 1e-3, "msec": 1e-3, "us": 1e-6, "usec": 1e-6, "ns": 1e-9}
# A sign is read so that "-5ms" is refused as negative rather than as unreadable.
_NUMBER = re.compile(r"^\s*([-+]?[0-9]*\.?[0-9]+(?:[eE][-+]?[0-9]+)?)\s*([a-zA-Z]*)\s*$")


def _split(text: str | float | int, what: str, units: dict[str, float], default: str) -> float:
    if isinstance(text, bool) or not isinstance(text, (str, numbers.Real)):
        raise TypeError(f"{what} must be a string such as {default!r} or a number, got {text!r}")
    if isinstance(text, numbers.Real):  # numpy's numbers too
        value, unit = float(text), ""
    else:
        m = _NUMBER.match(text)
        if m is None:
            raise ValueError(
                f"cannot read {what} {text!r}; write a number and one of the units "
                f"{', '.join(units)} (for example {default!r})"
            )
        value, unit = float(m.group(1)), m.group(2).lower()
    if unit and unit not in units:
        raise ValueError(
            f"unknown unit {unit!r} in {what} {text!r}; allowed units: {', '.join(units)}"
        )
    value = value * units[unit] if unit else value
    if not math.isfinite(value):
        raise ValueError(f"{what} must be a finite number, got {text!r}")
    return value


def _bare_number(text: Any) -> float | None:
    """The value of a string that is a positive number without a unit, else None (a negative
    one, "0" or a number that is not a string is left to the other checks)."""
    m = _NUMBER.match(text) if isinstance(text, str) else None
    if m is None or m.group(2) or not float(m.group(1)) > 0:
        return None
    return float(m.group(1))


def parse_rate(text: str | float | int) -> float:
    """Return a link rate in bits per second.

    Args:
        text: a number of bits per second, or a string in tc's notation with its unit
            (``"1gbit"``, ``"100mbit"``). A string without one is refused (tc would read it as
            bits per second): a command line's ``--bandwidth 10`` means 10 Gbit/s more likely
            than 10 bit/s. So are tc's bytes-per-second units (``"10gbps"``, 80 Gbit/s to tc,
            but 10 Gbit/s to most readers of "Gbps"), naming both readings.

    Returns:
        The rate in bits per second, positive.

    Example:
        >>> parse_rate("1gbit")
        1000000000.0
    """
    bare = _bare_number(text)
    if bare is not None:
        raise ValueError(
            f"bandwidth {text!r} needs a unit: as bits per second it would be {bare / 1e9:g}gbit; "
            f"write for example 10gbit or 100mbit (units: {', '.join(_RATE_UNITS)})"
        )
    m = _NUMBER.match(text) if isinstance(text, str) else None
    unit = m.group(2).lower() if m else ""
    if unit in _BYTE_RATE_UNITS:
        value, prefix = float(m.group(1)), unit[:-3]
        word = {"": "", "k": "kilo", "m": "mega", "g": "giga", "t": "tera"}[prefix]
        raise ValueError(
            f"bandwidth {text!r} is ambiguous: tc reads {unit!r} as {word}bytes per second "
            f"({value * _BYTE_RATE_UNITS[unit] / 1e9:g}gbit), where 'Gbps' usually means "
            f"gigabits per second; write {m.group(1)}{prefix}bit for {m.group(1)} {word}bits/s, "
            f"or {value * 8:g}{prefix}bit for {m.group(1)} {word}bytes/s"
        )
    rate = _split(text, "bandwidth", _RATE_UNITS, "1gbit")
    if not rate > 0:
        raise ValueError(f"bandwidth must be positive, got {text!r}")
    return rate


def parse_duration(text: str | float | int) -> float:
    """Return a duration in seconds from a number of seconds or ``"100us"``, ``"2ms"``, ``"1s"``.

    A string needs its unit (except ``"0"``): tc reads a bare number as microseconds, and a
    command line that took ``--latency 5`` for 5 seconds would model a link a million times
    slower than meant.

    Example:
        >>> parse_duration("2ms")
        0.002
    """
    if _bare_number(text) is not None:
        raise ValueError(
            f"duration {text!r} needs a unit: write for example {text.strip()}us, "
            f"{text.strip()}ms or {text.strip()}s (units: {', '.join(_TIME_UNITS)})"
        )
    value = _split(text, "duration", _TIME_UNITS, "100us")
    if value < 0:
        raise ValueError(f"duration must not be negative, got {text!r}")
    return value


def parse_count(text: str | int) -> int:
    """Return an element count from ``"25M"``, ``"1m"``, ``"500k"``, ``"1e6"`` or an int.

    Example:
        >>> parse_count("25M")
        25000000
    """
    if isinstance(text, int) and not isinstance(text, bool):
        value = text
    elif isinstance(text, str):
        m = _NUMBER.match(text)
        scale = {"": 1, "k": 10**3, "m": 10**6, "g": 10**9}
        if m is None or m.group(2).lower() not in scale:
            raise ValueError(f"cannot read count {text!r}; write e.g. 1000000, 1e6, 500k or 25M")
        value = float(m.group(1)) * scale[m.group(2).lower()]
    else:
        raise TypeError(f"count must be a string such as '25M' or an int, got {text!r}")
    if value < 1 or value == math.inf or value != int(value):
        raise ValueError(f"count must be a positive whole number, got {text!r}")
    return int(value)
