"""Kubernetes resource quantities ("24Gi", "250m") read from and written for people and YAML.

Parsing follows the Kubernetes quantity grammar (a number, then a binary suffix Ki..Ei, a decimal
suffix k..E or an exponent e3) and rounds up as Kubernetes does; formatting prints the canonical
form the API server would show, so a RuntimeClass we write reads back unchanged.
"""

from __future__ import annotations

import math
import re
from decimal import ROUND_CEILING, Decimal, InvalidOperation, localcontext

from kvmsandbox.errors import InvalidArgument

BINARY_SUFFIXES = {"Ki": 1024, "Mi": 1024**2, "Gi": 1024**3, "Ti": 1024**4, "Pi": 1024**5, "Ei": 1024**6}
DECIMAL_SUFFIXES = {"k": 10**3, "M": 10**6, "G": 10**9, "T": 10**12, "P": 10**15, "E": 10**18}
# Kubernetes keeps quantities in an int64; anything larger is not a quantity it accepts.
MAX_VALUE = 2**63 - 1

# <sign><digits>[.<digits>]<suffix>; the exponent alternative comes first so "1E3" is 1000, not 1 exa and "3".
_QUANTITY = re.compile(
    r"(?P<sign>[+-]?)(?P<number>\d+(?:\.\d*)?|\.\d+)"
    r"(?P<suffix>[eE][+-]?\d+|Ki|Mi|Gi|Ti|Pi|Ei|[mkMGTPE]|)"
)
_MEMORY_EXAMPLES = "e.g. 24Gi, 512Mi, 1G or a plain number of bytes"
_CPU_EXAMPLES = "e.g. 2, 0.5 or 250m"


def _where(what: str) -> str:
    return f"{what}: " if what else ""


def _scaled(text: str, suffix: str, number: str) -> Decimal:
    """The quantity's value in base units (bytes or cores), exactly."""
    with localcontext() as ctx:
        ctx.prec = 60
        value = Decimal(number)
        if suffix in BINARY_SUFFIXES:
            return value * BINARY_SUFFIXES[suffix]
        if suffix in DECIMAL_SUFFIXES:
            return value * DECIMAL_SUFFIXES[suffix]
        if suffix == "m":
            return value / 1000
        if suffix:
            exponent = int(suffix[1:])
            if value == 0 or exponent < -40:
                return Decimal(0) if value == 0 else Decimal("1e-40")
            # Keeps 1e999999 from building a huge number; int64 ends at 9.2e18 anyway.
            return value.scaleb(min(exponent, 40))
        return value


def _number(value: str | int | float, what: str, kind: str, examples: str) -> tuple[Decimal, str]:
    """Split a YAML or command-line value into its magnitude (in base units of the suffix) and suffix."""
    if isinstance(value, bool):
        raise InvalidArgument(f"{_where(what)}{value!r} is not a Kubernetes {kind} quantity ({examples})")
    if isinstance(value, int | float):
        if isinstance(value, float) and not math.isfinite(value):
            raise InvalidArgument(f"{_where(what)}{value!r} is not a Kubernetes {kind} quantity ({examples})")
        # repr() keeps YAML's 0.1 as 0.1 rather than the binary float's 0.1000000000000000055...
        text = repr(value)
        if "e" in text or "E" in text:
            text = format(Decimal(text), "f")
    elif isinstance(value, str):
        text = value.strip()
    else:
        raise InvalidArgument(f"{_where(what)}{value!r} is not a Kubernetes {kind} quantity ({examples})")
    match = _QUANTITY.fullmatch(text)
    if match is None:
        raise InvalidArgument(f"{_where(what)}{text!r} is not a Kubernetes {kind} quantity ({examples})")
    if match["sign"] == "-" and Decimal(match["number"]) != 0:
        raise InvalidArgument(f"{_where(what)}{text!r} is negative; a {kind} quantity must be 0 or more")
    try:
        scaled = _scaled(text, match["suffix"], match["number"])
    except InvalidOperation:
        raise InvalidArgument(f"{_where(what)}{text!r} is not a Kubernetes {kind} quantity ({examples})") from None
    return scaled, match["suffix"]


def _ceil(value: Decimal, text: str, what: str, unit: str) -> int:
    rounded = int(value.to_integral_value(rounding=ROUND_CEILING))
    if rounded > MAX_VALUE:
        raise InvalidArgument(f"{_where(what)}{text!r} is too large: Kubernetes quantities stop at {MAX_VALUE} {unit}")
    return rounded


def parse_memory(value: str | int | float, *, what: str = "") -> int:
    """Bytes in a memory quantity, rounded up to a whole byte; a bare number (YAML ``memory: 1024``) is bytes.

    ``what`` names the field or flag in the error message. The milli suffix is refused: ``500m`` is
    half a byte, which Kubernetes accepts but nobody means (they mean ``500Mi``).
    """
    scaled, suffix = _number(value, what, "memory", _MEMORY_EXAMPLES)
    if suffix == "m":
        raise InvalidArgument(
            f"{_where(what)}{value!r} means {scaled} bytes (m is 1/1000); write Mi for mebibytes or M for megabytes"
        )
    return _ceil(scaled, str(value), what, "bytes")


def parse_cpu(value: str | int | float, *, what: str = "") -> int:
    """Millicores in a CPU quantity, rounded up to a whole millicore; a bare number (``cpu: 2``) is cores.

    Only plain numbers, exponents and the milli suffix are taken: a byte suffix on a CPU figure
    ("2Gi") is almost always memory typed into the wrong field.
    """
    scaled, suffix = _number(value, what, "CPU", _CPU_EXAMPLES)
    is_exponent = len(suffix) > 1 and suffix[0] in "eE"
    if suffix not in ("", "m") and not is_exponent:
        raise InvalidArgument(f"{_where(what)}{value!r} is not a CPU quantity ({_CPU_EXAMPLES})")
    return _ceil(scaled * 1000, str(value), what, "millicores")


def format_memory(num_bytes: int) -> str:
    """The canonical Kubernetes form: the largest binary suffix that divides exactly ("160Mi", "2Gi"), else bytes."""
    if num_bytes < 0:
        raise InvalidArgument(f"memory cannot be negative: {num_bytes} bytes")
    if num_bytes == 0:
        return "0"
    for suffix, factor in reversed(BINARY_SUFFIXES.items()):
        if num_bytes % factor == 0:
            return f"{num_bytes // factor}{suffix}"
    return str(num_bytes)


def format_cpu(millicores: int) -> str:
    """Whole cores as a plain number ("2"), anything else in millicores ("250m")."""
    if millicores < 0:
        raise InvalidArgument(f"CPU cannot be negative: {millicores} millicores")
    if millicores % 1000 == 0:
        return str(millicores // 1000)
    return f"{millicores}m"
