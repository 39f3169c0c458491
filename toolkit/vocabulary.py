"""The toolkit's shared vocabulary: how methods are named and labelled, and how ε (∞ included) is written and read.

What a method *is* lives in :mod:`toolkit.methods`; the tuples below are views of that registry kept for the
modules that list the built-in methods. Every ε a user types is read by :func:`parse_epsilon` (the one parser).

Example::

    >>> from toolkit.vocabulary import format_epsilon, parse_epsilon, parse_epsilons, is_private
    >>> format_epsilon(float("inf")), format_epsilon(3.0), parse_epsilon("inf"), is_private("dual-priv")
    ('∞', '3', inf, True)
    >>> parse_epsilons("1, 3, inf")
    [1.0, 3.0, inf]
"""
from __future__ import annotations

import math

from toolkit.methods import all_methods, get_method, method_names

# Views of the registry at import (the built-in methods), for listings; checks ask toolkit.methods directly.
METHODS = method_names()
PRIVATE_METHODS = tuple(m.name for m in all_methods() if m.private)
# Methods whose step is DP-SGD (per-example gradients, clipped, noised): the only ones with a gradient to prune.
DP_SGD_METHODS = tuple(m.name for m in all_methods() if m.can_prune_update)
METHOD_LABELS = {m.name: m.label for m in all_methods()}
METHOD_COLOURS = {m.name: m.colour for m in all_methods()}

INFINITY_WORDS = ("inf", "+inf", "infinity", "∞", ".inf")
PRIVACY_UNIT = "one record = one source image"


def is_private(method: str) -> bool:
    """True for the methods that add DP noise and are accounted."""
    return method in method_names() and get_method(method).private


def method_label(method: str) -> str:
    return get_method(method).label if method in method_names() else method


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


def strict_json(value):
    """``value`` with every non-finite float, also inside dicts, lists and tuples, spelled as :func:`epsilon_to_json`
    does, and dict keys as strings: what every JSON the toolkit writes goes through, since Python's ``json`` would
    write ``Infinity`` / ``NaN``, which strict readers (``jq``, JavaScript's ``JSON.parse``) refuse.

    >>> strict_json({"epsilon": float("inf"), "loss": float("nan"), 1: [2.5, float("-inf")]})
    {'epsilon': 'inf', 'loss': 'nan', '1': [2.5, '-inf']}
    """
    if isinstance(value, dict):
        return {str(k): strict_json(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [strict_json(v) for v in value]
    return epsilon_to_json(value)
