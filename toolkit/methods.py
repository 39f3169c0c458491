"""What a training method is: one :class:`Method` record per method, in one registry that the rest asks.

Whether a method is private, what it noises (a gradient vector or a scalar), what it prunes by default, which
capabilities it has and its default learning rate live here and nowhere else. Adding a method is: write its
optimizer (the :class:`toolkit.optimizers.TrainingOptimizer` protocol), register its builder with
:func:`toolkit.optimizers.register_optimizer`, and register its record here with :func:`register_method`.

Example::

    >>> from toolkit.methods import get_method, method_names
    >>> method_names()
    ('non-private', 'dp-sgd', 'dual-priv', 'dp-zo')
    >>> m = get_method("dual-priv")
    >>> m.private, m.noise, m.prunes_update, m.can_prune_update, m.default_lr
    (True, 'gradient', True, True, 0.005)
    >>> get_method("dp-zo").can_prune_update
    False
"""
from __future__ import annotations

from dataclasses import dataclass

NOISE_KINDS = ("none", "gradient", "scalar")


@dataclass(frozen=True)
class Method:
    """One training method and everything the toolkit needs to know about it."""

    name: str
    label: str                      # how people see it (tables, legends, the dashboard)
    colour: str                     # its colour in every figure
    private: bool                   # adds DP noise and is accounted
    noise: str                      # "none", "gradient" (per-coordinate, DP-SGD) or "scalar" (DP-ZO)
    default_lr: float
    prunes_tokens: bool = False     # mechanism 1 on by default (token strategy "dual-priv", 75 % pruned)
    prunes_update: bool = False     # mechanism 2 on by default (20 % of the noisy update zeroed)
    backward: bool = True           # computes gradients by backpropagation (activation checkpointing applies)
    distributed: bool = True        # runs data-parallel under torchrun
    description: str = ""

    def __post_init__(self):
        if self.noise not in NOISE_KINDS:
            raise ValueError(f"method {self.name!r}: noise must be one of {NOISE_KINDS}, got {self.noise!r}")
        if self.private != (self.noise != "none"):
            raise ValueError(f"method {self.name!r}: a private method adds noise and a non-private one does not")
        if self.prunes_update and self.noise != "gradient":
            raise ValueError(f"method {self.name!r}: update pruning needs a noisy gradient vector to prune")

    @property
    def can_prune_update(self) -> bool:
        """Mechanism 2 needs a per-coordinate (DP-SGD) gradient: the only update with coordinates to rank."""
        return self.noise == "gradient"

    @property
    def default_token_strategy(self) -> str:
        return "dual-priv" if self.prunes_tokens else "none"

    @property
    def default_grad_prune_ratio(self) -> float:
        return 0.2 if self.prunes_update else 0.0

    @property
    def default_sampling(self) -> str:
        """Poisson sampling is what the accountant assumes; non-private runs shuffle fixed batches."""
        return "poisson" if self.private else "fixed"


_REGISTRY: dict[str, Method] = {}


def register_method(method: Method, replace: bool = False) -> Method:
    """Add ``method`` to the registry (``replace=True`` to redefine an existing name)."""
    if method.name in _REGISTRY and not replace:
        raise ValueError(f"method {method.name!r} is already registered")
    _REGISTRY[method.name] = method
    return method


def unregister_method(name: str) -> None:
    """Remove a registered method (tests that register a toy method clean up with this)."""
    _REGISTRY.pop(name, None)


def method_names() -> tuple[str, ...]:
    """Every registered method's name, in registration order."""
    return tuple(_REGISTRY)


def get_method(name: str) -> Method:
    """The record of ``name``; ``ValueError`` naming the choices for an unknown one."""
    try:
        return _REGISTRY[name]
    except (KeyError, TypeError):
        raise ValueError(f"unknown method {name!r}; choose one of {tuple(_REGISTRY)}") from None


def all_methods() -> tuple[Method, ...]:
    return tuple(_REGISTRY.values())


register_method(Method("non-private", "Non-private", "#7f7f7f", private=False, noise="none", default_lr=1e-3,
                       description="plain fine-tuning: no clipping, no noise, nothing accounted"))
register_method(Method("dp-sgd", "DP-SGD", "#1f77b4", private=True, noise="gradient", default_lr=5e-3,
                       description="Opacus DP-SGD: per-example gradients clipped, Gaussian noise on their sum"))
register_method(Method("dual-priv", "Dual-Priv", "#d62728", private=True, noise="gradient", default_lr=5e-3,
                       prunes_tokens=True, prunes_update=True,
                       description="DP-SGD on pruned visual tokens (mechanism 1) with the noisy update pruned "
                                   "(mechanism 2)"))
register_method(Method("dp-zo", "DP-ZO", "#2ca02c", private=True, noise="scalar", default_lr=2e-3, backward=False,
                       distributed=False,
                       description="zeroth-order: two forwards per step, one clipped and noised scalar per example"))
