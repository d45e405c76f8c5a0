"""A second policy of the demo world, beside its harm cost: naming products.

A shop's assistant may name a product now and then, but a conversation should not turn
into a shopping list: `product_policy()` counts the products the world's advice names
(one cost per mention). Its risk is cumulative, which is what safety sessions are for
(`examples/safety_session.py`, `safeguard eval --conversations`).
"""

from __future__ import annotations

from inference_safeguard.scorers import KeywordCost

PRODUCT_WORDS = (
    "soap",
    "brush",
    "towel",
    "gloves",
    "product",
    "salt",
    "herbs",
    "lid",
    "package",
    "medicines",
    "tester",
    "cord",
    "bulb",
    "tires",
    "oil",
    "mulch",
    "spray",
    "treats",
    "drive",
    "socks",
)
"""The products the demo world's advice names."""


def product_policy() -> KeywordCost:
    """Cost 1 per product the response names (case-insensitive, whole words)."""
    return KeywordCost(list(PRODUCT_WORDS))
