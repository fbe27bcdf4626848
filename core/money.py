"""How an amount of money is written for people: the receipt e-mail and the review page."""

from __future__ import annotations


def format_money(cents: int, currency: str) -> str:
    """`1250, "EUR"` -> `"12.50 EUR"`; integer arithmetic, so no amount is rounded."""
    return f"{cents // 100}.{cents % 100:02d} {currency}"
