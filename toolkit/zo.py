"""DP zeroth-order optimisation (the DPZero / DP-ZO family): two forward passes, no backward.

One step on a Poisson batch, with a shared random direction z ~ N(0, I) over all trained parameters::

    L⁺_i = L_i(θ + μz),  L⁻_i = L_i(θ − μz)               (two forwards, no autograd)
    d_i  = (L⁺_i − L⁻_i) / (2μ)                          (per-example directional derivative)
    d̄_i  = clip(d_i, −C, C)                              (sensitivity C per example)
    ĝ    = (Σ_i d̄_i + N(0, σ²C²)) / B_expected           (one scalar Gaussian mechanism)
    θ    ← θ − lr · ĝ · z

Privacy: adding or removing one record changes Σ_i d̄_i by at most C, so each step is the same
Poisson-subsampled Gaussian mechanism (noise multiplier σ, rate q) as a DP-SGD step and is accounted
by the same accountant (:mod:`toolkit.privacy.accounting`). z does not depend on the data, so
releasing ĝ·z is post-processing. z is public randomness (derived from ``seed`` and the step index);
the noise comes from a separate, secret generator (``noise_seed``).

Memory: z is never stored for the whole model. It is regenerated from the step's seed, one parameter
tensor at a time, and applied in place: θ += μz, θ −= 2μz, θ += μz (restores θ up to float rounding),
θ −= lr·ĝ·z. Peak extra memory is one parameter tensor's worth of z.

Example::

    >>> import torch
    >>> from toolkit.zo import DPZeroOrder
    >>> w = torch.zeros(3)
    >>> x = torch.randn(4, 3)
    >>> zo = DPZeroOrder([w], lr=0.1, noise_multiplier=1.0, max_grad_norm=1.0, expected_batch_size=4,
    ...                  sample_rate=0.1, seed=0, noise_seed=0)
    >>> loss = zo.step(lambda: (x @ w - 1.0) ** 2)
    >>> zo.steps_taken, bool(zo.last_clipped_scalars.abs().max() <= 1.0)
    (1, True)
"""
from __future__ import annotations

import math
from typing import Callable, Iterable, Sequence

import numpy as np
import torch

from toolkit.compat import opacus_noise
from toolkit.secret_random import reseed_from_os, seeded_generator
from toolkit.privacy.accounting import (
    check_sampled_step,
    accountant_state,
    epsilon_spent,
    make_accountant,
    resume_accountant,
)


def _number(name: str, value, minimum: float = 0.0, strict: bool = True) -> float:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) \
        and (value > minimum if strict else value >= minimum)
    if not ok:
        raise ValueError(f"{name} must be a finite number {'>' if strict else '>='} {minimum}, got {value!r}")
    return float(value)


class DPZeroOrder:
    """DP zeroth-order optimiser over ``params`` (see the module docstring for the maths).

    Args:
        params: the tensors to train (e.g. the LoRA parameters); updated in place.
        lr: learning rate.
        mu: perturbation scale μ of the finite difference.
        noise_multiplier: σ; the scalar noise has std σ·C.
        max_grad_norm: C, the clipping bound of each per-example scalar.
        expected_batch_size: q·N; the noisy sum is divided by it.
        sample_rate: q, the Poisson rate the accountant records.
        accountant: ``"prv"`` or ``"rdp"``.
        seed: seed of the (public) directions; step t uses a seed derived from (seed, t).
        noise_seed: seed of the noise generator, for reproducible experiments and tests ONLY (a known seed lets
            anyone subtract the noise: no privacy). None (default): seeded from OS entropy.
        secure_mode: Opacus' floating-point-attack-resistant Gaussian draw for the scalar noise.
        module: the module the losses are computed through (the training loop forwards through
            :attr:`module`, as with every optimizer of :mod:`toolkit.optimizers`); not used by the maths.

    Attributes (for reporting and tests): ``last_clipped_scalars`` (d̄, ``[B]`` float64),
    ``last_projected_grad`` (ĝ), ``steps_taken``.
    """

    def __init__(self, params: Iterable[torch.Tensor], *, lr: float, mu: float = 1e-3, noise_multiplier: float,
                 max_grad_norm: float, expected_batch_size: int, sample_rate: float, accountant: str = "prv",
                 seed: int = 0, noise_seed: int | None = None, secure_mode: bool = False,
                 module: torch.nn.Module | None = None):
        self.params = [p for p in params]
        if not self.params:
            raise ValueError("DPZeroOrder got no parameters")
        if not all(torch.is_tensor(p) and p.is_floating_point() for p in self.params):
            raise TypeError("params must be floating-point tensors")
        devices = {p.device for p in self.params}
        if len(devices) > 1:
            raise ValueError(f"all parameters must be on one device, found {sorted(map(str, devices))}")
        self.device = devices.pop()
        self.lr = _number("lr", lr, strict=False)
        self.mu = _number("mu", mu)
        self.noise_multiplier = _number("noise_multiplier", noise_multiplier, strict=False)
        self.max_grad_norm = _number("max_grad_norm", max_grad_norm)
        self.expected_batch_size, self.sample_rate = check_sampled_step(expected_batch_size, sample_rate, accountant)
        self.accountant = make_accountant(accountant)
        self.seed = int(seed)
        self.secure_mode = bool(secure_mode)
        self.module = module
        self.optimizer = None  # no inner torch optimizer: the update is applied in place
        if noise_seed is not None and self.secure_mode:
            raise ValueError("secure_mode draws every noise sample from fresh OS randomness: a noise_seed is "
                             "refused (it would make the noise re-creatable)")
        # 128 bits of OS entropy in the whole generator state (torch's own seed() keeps 32 bits)
        self.noise_generator = seeded_generator() if noise_seed is None \
            else torch.Generator().manual_seed(int(noise_seed))
        self.steps_taken = 0
        self.last_clipped_scalars = torch.zeros(0, dtype=torch.float64)
        self.last_projected_grad = 0.0

    # ------------------------------------------------------------ the direction z

    def _direction_seed(self, step: int) -> int:
        return int(np.random.SeedSequence([self.seed, step]).generate_state(1, dtype=np.uint64)[0] >> 1)

    @torch.no_grad()
    def _add_direction(self, scale: float, step_seed: int) -> None:
        """θ += scale · z, regenerating z tensor by tensor from ``step_seed`` (never the whole z at once)."""
        generator = torch.Generator(device=self.device)
        generator.manual_seed(step_seed)
        for p in self.params:
            z = torch.randn(p.shape, generator=generator, device=p.device,
                            dtype=torch.promote_types(p.dtype, torch.float32))
            if z.dtype == p.dtype:
                p.add_(z, alpha=scale)
            else:  # low-precision params: scale in fp32, round once
                p.add_((z * scale).to(p.dtype))
            del z

    # ------------------------------------------------------------ steps

    def _check_losses(self, losses, which: str) -> torch.Tensor:
        if not torch.is_tensor(losses) or losses.dim() != 1:
            raise ValueError(f"per_example_loss_fn must return a 1-D tensor [batch] ({which} pass returned "
                             f"{type(losses).__name__}{'' if not torch.is_tensor(losses) else tuple(losses.shape)})")
        losses = losses.detach().to(torch.float64)
        if not bool(torch.isfinite(losses).all()):
            raise ValueError(f"non-finite per-example loss in the {which} pass")
        return losses

    def step(self, per_example_loss_fn: Callable[[], torch.Tensor] | Sequence[Callable[[], torch.Tensor]]) -> float:
        """One private step; ``per_example_loss_fn()`` evaluates the batch's per-example losses ``[B]`` at the
        current parameters (called twice, under ``torch.no_grad``). Returns the mean of L⁺ and L⁻ (not private).
        A list of functions is one logical batch in physical chunks: each pass runs them one after the other
        and concatenates their losses (forward-only, so only one chunk's activations are alive at a time); the
        update, the noise draw and the accountant step are the same as for one function over the whole batch.
        A batch of size 0 is allowed (same as :meth:`empty_step`)."""
        if isinstance(per_example_loss_fn, (list, tuple)):
            chunks = list(per_example_loss_fn)
            if not chunks:
                raise ValueError("no chunks: call empty_step() for an empty Poisson batch")
            per_example_loss_fn = lambda: torch.cat([  # noqa: E731  (a pass over every chunk)
                self._check_losses(fn(), "chunk") for fn in chunks])
        step_seed = self._direction_seed(self.steps_taken)
        offset = 0.0  # how far θ currently sits from where it started, in units of z
        try:
            with torch.no_grad():
                self._add_direction(self.mu, step_seed)
                offset = self.mu
                plus = self._check_losses(per_example_loss_fn(), "θ+μz")
                self._add_direction(-2.0 * self.mu, step_seed)
                offset = -self.mu
                minus = self._check_losses(per_example_loss_fn(), "θ−μz")
        finally:
            if offset:
                self._add_direction(-offset, step_seed)  # restore θ even if the loss function raised
        if plus.shape != minus.shape:
            raise ValueError(f"per_example_loss_fn returned {plus.shape[0]} then {minus.shape[0]} losses: "
                             "both passes must see the same batch")
        scalars = (plus - minus) / (2.0 * self.mu)
        self._noisy_update(scalars.clamp(-self.max_grad_norm, self.max_grad_norm), step_seed)
        if plus.numel() == 0:
            return float("nan")
        return float(((plus + minus) / 2).mean())

    def empty_step(self) -> None:
        """The step of an empty Poisson batch: ĝ = N(0, σ²C²)/B_expected along a fresh z; accounted."""
        self._noisy_update(torch.zeros(0, dtype=torch.float64), self._direction_seed(self.steps_taken))

    def _noisy_update(self, clipped: torch.Tensor, step_seed: int) -> None:
        if self.secure_mode:
            reseed_from_os(self.noise_generator)
        noise = opacus_noise(std=self.noise_multiplier * self.max_grad_norm,
                             reference=torch.zeros(1, dtype=torch.float64), generator=self.noise_generator,
                             secure_mode=self.secure_mode).to(torch.float64)
        projected = float((clipped.sum() + noise[0]) / self.expected_batch_size)
        self._add_direction(-self.lr * projected, step_seed)
        self.accountant.step(noise_multiplier=self.noise_multiplier, sample_rate=self.sample_rate)
        self.last_clipped_scalars = clipped
        self.last_projected_grad = projected
        self.steps_taken += 1

    # ------------------------------------------------------------ reporting and checkpoints

    def epsilon(self, delta: float) -> float:
        """ε spent so far at ``delta`` (same accounting as the DP-SGD engine)."""
        return epsilon_spent(self.accountant, delta)

    def state_dict(self) -> dict:
        """Steps, direction seed, accountant history and the (SECRET) noise generator state; not the weights."""
        return {"steps_taken": self.steps_taken, "seed": self.seed, "lr": self.lr,
                "accountant": accountant_state(self.accountant),
                "noise_generator": self.noise_generator.get_state(),
                "config": {"mu": self.mu, "noise_multiplier": self.noise_multiplier,
                           "max_grad_norm": self.max_grad_norm, "expected_batch_size": self.expected_batch_size,
                           "sample_rate": self.sample_rate}}

    def load_state_dict(self, state: dict) -> None:
        """Resume; only on a fresh optimiser, so no accounted step is ever dropped."""
        accountant = resume_accountant(self.accountant, state, ("steps_taken", "seed", "accountant"), "DP-ZO optimiser")
        self.accountant = accountant
        self.steps_taken = int(state["steps_taken"])
        self.seed = int(state["seed"])
        if "lr" in state:
            self.lr = float(state["lr"])
        if state.get("noise_generator") is not None:
            self.noise_generator.set_state(state["noise_generator"])
