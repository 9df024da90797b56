"""KVP amounts: the NUMERIC(20,8) quantum and the exact text form every reader sees."""

from __future__ import annotations

from decimal import Decimal

AMOUNT_QUANTUM = Decimal("0.00000001")  # NUMERIC(20,8)


def money(value: Decimal) -> str:
    """A KVP amount as text with exactly 8 decimals ("0.00000000", never "0E-8")."""
    return f"{Decimal(value).quantize(AMOUNT_QUANTUM):f}"


def amount_text(value: Decimal | None) -> str | None:
    """`money` for a nullable column."""
    return None if value is None else money(value)


def plain_decimal(value: Decimal | None) -> str | None:
    """A NUMERIC as plain text without trailing zeros ("1.5", "10", never "1E+1"); None stays None."""
    if value is None:
        return None
    text = f"{Decimal(value):f}"
    return text.rstrip("0").rstrip(".") if "." in text else text
