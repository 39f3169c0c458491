"""The toolkit's shared vocabulary: the method names, their labels and colours, and how ε = ∞ is written.

Every module that names a method or prints/parses an ε imports it from here, so a new method or a new spelling
of infinity is one edit.

Example::

    >>> from toolkit.vocabulary import format_epsilon, parse_epsilon, parse_epsilons, is_private
    >>> format_epsilon(float("inf")), format_epsilon(3.0), parse_epsilon("inf"), is_private("dual-priv")
    ('∞', '3', inf, True)
    >>> parse_epsilons("1, 3, inf")
    [1.0, 3.0, inf]
"""
from __future__ import annotations

import math

METHODS = ("non-private", "dp-sgd", "dual-priv", "dp-zo")
PRIVATE_METHODS = ("dp-sgd", "dual-priv", "dp-zo")
# Methods whose step is DP-SGD (per-example gradients, clipped, noised): the only ones with a gradient to prune.
DP_SGD_METHODS = ("dp-sgd", "dual-priv")
METHOD_LABELS = {"non-private": "Non-private", "dp-sgd": "DP-SGD", "dual-priv": "Dual-Priv", "dp-zo": "DP-ZO"}
METHOD_COLOURS = {"non-private": "#7f7f7f", "dp-sgd": "#1f77b4", "dual-priv": "#d62728", "dp-zo": "#2ca02c"}

INFINITY_WORDS = ("inf", "+inf", "infinity", "∞", ".inf")
PRIVACY_UNIT = "one record = one source image"


def is_private(method: str) -> bool:
    """True for the methods that add DP noise and are accounted."""
    return method in PRIVATE_METHODS


def method_label(method: str) -> str:
    return METHOD_LABELS.get(method, method)


def format_epsilon(value, digits: int | None = None) -> str:
    """ε for people: ``∞`` for infinity (or None), else ``%g`` (or ``digits`` decimals)."""
    if value is None or (isinstance(value, (int, float)) and math.isinf(value)):
        return "∞"
    if isinstance(value, float) and math.isnan(value):
        return "n/a"
    return f"{value:.{digits}f}" if digits is not None else f"{value:g}"


def parse_epsilon(text) -> float:
    """ε from a user: a number > 0, or one of :data:`INFINITY_WORDS`. Raises ``ValueError`` naming the input."""
    if isinstance(text, (int, float)) and not isinstance(text, bool):
        value = float(text)
    else:
        word = str(text).strip().lower()
        if word in INFINITY_WORDS:
            return math.inf
        try:
            value = float(word)
        except ValueError:
            raise ValueError(f"epsilon must be a number > 0 or 'inf', got {text!r}") from None
    if math.isnan(value) or value <= 0:
        raise ValueError(f"epsilon must be a number > 0 or 'inf', got {text!r}")
    return value


def parse_epsilons(text) -> list[float]:
    """A list of ε from a user: ``"0.5, 1; 3, inf"`` -> ``[0.5, 1.0, 3.0, inf]`` (commas or semicolons), each entry
    as :func:`parse_epsilon`. Raises ``ValueError`` naming the first bad entry, or saying the list is empty."""
    values = []
    for part in str(text or "").replace(";", ",").split(","):
        part = part.strip()
        if not part:
            continue
        try:
            values.append(parse_epsilon(part))
        except ValueError:
            raise ValueError(f"ε list: {part!r} is not a number > 0 (every ε must be > 0, or 'inf')") from None
    if not values:
        raise ValueError("give at least one ε, e.g. '1, 3, 8'")
    return values


def epsilon_to_json(value):
    """ε (or any float) in strict JSON: ``"inf"`` / ``"nan"`` strings for the values JSON lacks."""
    if isinstance(value, float) and not math.isfinite(value):
        return "nan" if math.isnan(value) else ("inf" if value > 0 else "-inf")
    return value
