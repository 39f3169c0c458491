"""One optimizer protocol for every method, and the registry that builds the right one from a config.

Every training step in the toolkit goes through an object with this interface (:class:`TrainingOptimizer`):

* ``module``: the module to forward through (Opacus' wrapper for DP-SGD, the plain module otherwise);
* ``step(per_example_losses_fn) -> float``: ``per_example_losses_fn()`` runs the forward and returns ``[B]``
  per-example losses; the optimizer computes the update its own way and returns the batch's mean loss.
  ``step([fn_1, ..., fn_m])`` takes one logical batch as m physical chunks (each ``fn_k`` forwards its own
  records): the update is the one of the whole batch, with one optimizer step (and, for the private methods,
  one noise draw and one accountant step), while only one chunk's activations are alive at a time;
* ``empty_step()``: the step of an empty Poisson batch (private methods still add noise and account it);
* ``epsilon(delta)``, ``accountant`` (``None`` when nothing is accounted);
* ``state_dict()`` / ``load_state_dict(state)`` for checkpoints.

Three implementations: :class:`NonPrivateOptimizer` (a plain torch optimizer on the mean loss),
:class:`toolkit.privacy.DPEngine` (Opacus DP-SGD, with update pruning for Dual-Priv) and
:class:`toolkit.zo.DPZeroOrder`. :func:`make_optimizer` picks one through :data:`OPTIMIZER_BUILDERS`; a new method
registers its builder with :func:`register_optimizer` (and its record with :func:`toolkit.methods.register_method`).

Example::

    >>> import torch
    >>> from toolkit.optimizers import NonPrivateOptimizer
    >>> net = torch.nn.Linear(2, 1)
    >>> opt = NonPrivateOptimizer(net, torch.optim.SGD(net.parameters(), lr=0.1))
    >>> x = torch.randn(4, 2)
    >>> loss = opt.step(lambda: opt.module(x).squeeze(1) ** 2)
    >>> opt.epsilon(1e-5)
    inf
"""
from __future__ import annotations

import math
from typing import Callable, Protocol, Sequence, Union

import torch
from torch import nn

from toolkit.config import OPTIMIZERS, TrainConfig
from toolkit.distributed import all_reduce_sum, context
from toolkit.privacy import make_pre_noise_mask, make_private
from toolkit.privacy.adam_bc import DPAdamBC, noise_variance
from toolkit.zo import DPZeroOrder

LossesFn = Callable[[], torch.Tensor]
Chunks = Union[LossesFn, Sequence[LossesFn]]   # one logical batch: a function, or one function per physical chunk


def as_chunks(per_example_losses_fn: Chunks) -> list[LossesFn]:
    """The list of chunk functions of a logical batch (a single function is one chunk)."""
    chunks = list(per_example_losses_fn) if isinstance(per_example_losses_fn, (list, tuple)) \
        else [per_example_losses_fn]
    if not chunks or not all(callable(fn) for fn in chunks):
        raise ValueError("step takes a function returning per-example losses, or a non-empty list of them")
    return chunks


class TrainingOptimizer(Protocol):
    module: nn.Module
    accountant: object | None

    def step(self, per_example_losses_fn: Chunks) -> float: ...

    def empty_step(self) -> None: ...

    def epsilon(self, delta: float) -> float: ...

    def state_dict(self) -> dict: ...

    def load_state_dict(self, state: dict) -> None: ...


class NonPrivateOptimizer:
    """A torch optimizer stepping on the mean of the per-example losses (no clipping, no noise, no accountant).

    ``distributed=True`` (data-parallel ranks, :mod:`toolkit.distributed`): each rank backpropagates the sum of
    its share's losses; the gradient sums and the example counts are all-reduced and divided, so every rank steps
    on the mean over the global batch."""

    accountant = None

    def __init__(self, module: nn.Module, optimizer: torch.optim.Optimizer, distributed: bool = False):
        self.module, self.optimizer, self.distributed = module, optimizer, distributed

    def step(self, per_example_losses_fn: Chunks) -> float:
        """Gradient of the batch mean ``(1/B) Σ_i L_i``; with chunks, each chunk backpropagates
        ``Σ_{i in chunk} L_i`` into the accumulated ``.grad``, divided by B (the whole batch) before the step."""
        chunks = as_chunks(per_example_losses_fn)
        self.optimizer.zero_grad(set_to_none=True)
        if len(chunks) == 1 and not self.distributed:
            losses = chunks[0]()
            losses.mean().backward()
            self.optimizer.step()
            return float(losses.detach().double().mean())
        total, count = 0.0, 0
        for fn in chunks:  # B is only known after every chunk (and every rank): scale by 1/B at the end
            losses = fn()
            losses.sum().backward()
            total, count = total + float(losses.detach().double().sum()), count + losses.shape[0]
        self._mean_and_step(count)
        return total / count

    def _mean_and_step(self, count: int) -> None:
        params = [p for group in self.optimizer.param_groups for p in group["params"]]
        if self.distributed:
            for p in params:  # a rank whose share did not reach a parameter still joins the reduction
                if p.grad is None:
                    p.grad = torch.zeros_like(p)
            grads = all_reduce_sum([p.grad for p in params] + [torch.tensor([float(count)], device=params[0].device)])
            count = int(grads.pop().item())
            for p, g in zip(params, grads):
                p.grad = g
        if count == 0:
            return
        with torch.no_grad():
            for p in params:
                if p.grad is not None:
                    p.grad.div_(count)
        self.optimizer.step()

    def empty_step(self) -> None:
        """Nothing to do: an empty batch carries no gradient and nothing is accounted (distributed: this rank's
        share is empty, so it joins the reduction with zeros)."""
        if self.distributed:
            self.optimizer.zero_grad(set_to_none=True)
            self._mean_and_step(0)

    def epsilon(self, delta: float) -> float:
        return math.inf

    def state_dict(self) -> dict:
        return {"optimizer": self.optimizer.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        if "optimizer" not in state:
            raise ValueError("optimizer state has no 'optimizer' entry (was it made by state_dict?)")
        self.optimizer.load_state_dict(state["optimizer"])


def torch_optimizer(params, name: str, lr: float, noise_variance: float = 0.0) -> torch.optim.Optimizer:
    """The inner optimizer every method wraps (the DP ones add clipping and noise around it). ``dp-adambc``
    corrects Adam's second moment for the DP noise variance Φ (:mod:`toolkit.privacy.adam_bc`)."""
    if name == "dp-adambc":
        return DPAdamBC(params, lr=lr, noise_variance=noise_variance)
    if name == "adam":
        return torch.optim.Adam(params, lr=lr)
    if name == "adamw":
        return torch.optim.AdamW(params, lr=lr)
    if name == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=0.9)
    raise ValueError(f"unknown optimizer {name!r}; choose one of {OPTIMIZERS}")


def _non_private(c: TrainConfig, module, params, noise_multiplier, sample_rate,
                 public_gradients=None) -> NonPrivateOptimizer:
    return NonPrivateOptimizer(module, torch_optimizer(params, c.optimizer, c.lr), distributed=context().enabled)


def _dp_sgd(c: TrainConfig, module, params, noise_multiplier, sample_rate, public_gradients=None):
    inner = torch_optimizer(params, c.optimizer, c.lr,
                            noise_variance(noise_multiplier, c.max_grad_norm, c.expected_batch_size))
    mask = make_pre_noise_mask(c.update_mask, c.grad_prune_ratio, c.prune_scope,
                               public_gradients=public_gradients, seed=c.seed)
    return make_private(module, inner, noise_multiplier=noise_multiplier,
                        max_grad_norm=c.max_grad_norm, expected_batch_size=c.expected_batch_size,
                        sample_rate=sample_rate, accountant=c.accountant, grad_prune_ratio=c.grad_prune_ratio,
                        prune_scope=c.prune_scope, pruned_state=c.pruned_state,
                        grad_sample_mode=c.grad_sample_mode, noise_seed=c.noise_seed, secure_mode=c.secure_mode,
                        pre_noise_mask=mask, distributed=context().enabled)


def _dp_zo(c: TrainConfig, module, params, noise_multiplier, sample_rate, public_gradients=None) -> DPZeroOrder:
    if context().enabled:
        raise ValueError("dp-zo does not run data-parallel yet (its per-example scalars would need their own "
                         "all-reduce); launch it with one process")
    return DPZeroOrder(params, lr=c.lr, mu=c.zo_mu, noise_multiplier=noise_multiplier,
                       max_grad_norm=c.max_grad_norm, expected_batch_size=c.expected_batch_size,
                       sample_rate=sample_rate, accountant=c.accountant, seed=c.seed, noise_seed=c.noise_seed,
                       secure_mode=c.secure_mode, module=module)


# builder(config, module, trainable params, noise_multiplier, sample_rate, public_gradients=None) -> optimizer
OPTIMIZER_BUILDERS: dict[str, Callable] = {
    "non-private": _non_private,
    "dp-sgd": _dp_sgd,
    "dual-priv": _dp_sgd,   # the same engine; update pruning comes from grad_prune_ratio
    "dp-zo": _dp_zo,
}


def register_optimizer(method: str, builder: Callable, replace: bool = False) -> Callable:
    """Register the optimizer builder of ``method`` (see :data:`OPTIMIZER_BUILDERS` for its signature)."""
    if method in OPTIMIZER_BUILDERS and not replace:
        raise ValueError(f"an optimizer for method {method!r} is already registered")
    OPTIMIZER_BUILDERS[method] = builder
    return builder


def make_optimizer(c: TrainConfig, module: nn.Module, noise_multiplier: float, sample_rate: float,
                   public_gradients: list[torch.Tensor] | None = None):
    """The method's :class:`TrainingOptimizer` over ``module``'s trainable parameters (``c`` resolved: the
    method's rules were checked by :func:`toolkit.config.check_config`). ``public_gradients`` (aligned with those
    parameters) feed the ``public`` update mask."""
    if c.method not in OPTIMIZER_BUILDERS:
        raise ValueError(f"method {c.method!r} has no optimizer: register one with register_optimizer")
    params = [p for p in module.parameters() if p.requires_grad]
    return OPTIMIZER_BUILDERS[c.method](c, module, params, noise_multiplier, sample_rate,
                                        public_gradients=public_gradients)
