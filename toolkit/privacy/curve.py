"""ε after every step of a run, computed once: the same Opacus PRV/RDP analysis, without recomputing it per step.

Every step of a toolkit run is the same sampled Gaussian mechanism (σ, q). Opacus' accountants recompute the
whole analysis on each ``get_epsilon`` call, and most of that cost is the Rényi-DP vector
``compute_rdp(q, σ, 1, orders)``, which does not depend on the step count (RDP composes additively:
RDP after t steps = t × RDP of one step). :class:`EpsilonCurve` computes that vector once, then:

* RDP: ε(t) = ``get_privacy_spent(orders, t · rdp₁, δ)`` (Opacus' conversion).
* PRV (Gopi et al. 2021, as in ``opacus.accountants.PRVAccountant``): the discretisation domain is sized for
  the *planned* number of steps T (remark 5.6 of the paper, with the same RDP bounds Opacus uses), the
  truncated PRV is discretised once with Opacus' ``discretize``, and ε(t) for t ≤ T comes from Opacus'
  ``compose_heterogeneous`` + ``compute_epsilon`` (upper bound). A domain safe for T compositions is safe
  for fewer (the t-fold loss is more concentrated) and its mesh is at least as fine, so every ε(t) is a valid
  upper bound within ``eps_error``; at t = T it equals ``PRVAccountant.get_epsilon`` (tested).

The value reported is min(PRV, RDP), as in :mod:`toolkit.privacy.accounting` (both are upper bounds).

Example::

    >>> from toolkit.privacy.curve import EpsilonCurve
    >>> curve = EpsilonCurve(noise_multiplier=1.0, sample_rate=0.1, planned_steps=50, delta=1e-5)
    >>> curve(10) < curve(50)
    True
"""
from __future__ import annotations

import functools
import math
import warnings

import numpy as np
from opacus.accountants.analysis.prv import (Domain, PoissonSubsampledGaussianPRV, TruncatedPrivacyRandomVariable,
                                             compose_heterogeneous, discretize)
from opacus.accountants.analysis.rdp import compute_rdp, get_privacy_spent
from opacus.accountants.rdp import RDPAccountant

from toolkit.privacy.accounting import PRV_MAX_EPSILON, _check_accountant_name, _check_delta


@functools.lru_cache(maxsize=256)
def _rdp_one_step(sample_rate: float, noise_multiplier: float) -> tuple[tuple, np.ndarray]:
    orders = tuple(RDPAccountant.DEFAULT_ALPHAS)
    return orders, np.asarray(compute_rdp(q=sample_rate, noise_multiplier=noise_multiplier, steps=1, orders=orders))


def _rdp_epsilon(orders, rdp, delta: float) -> float:
    with warnings.catch_warnings(), np.errstate(all="ignore"):
        warnings.simplefilter("ignore")  # "optimal order is the largest alpha": still a valid bound
        eps, _ = get_privacy_spent(orders=orders, rdp=rdp, delta=delta)
    return float(eps)


class EpsilonCurve:
    """ε spent after t = 1..``planned_steps`` identical Poisson-sampled Gaussian steps, for one δ."""

    def __init__(self, noise_multiplier: float, sample_rate: float, planned_steps: int, delta: float,
                 accountant: str = "prv", eps_error: float = 0.01):
        if planned_steps < 1:
            raise ValueError(f"planned_steps must be >= 1, got {planned_steps}")
        if not 0 < sample_rate <= 1:
            raise ValueError(f"sample_rate must be in (0, 1], got {sample_rate}")
        if not noise_multiplier >= 0:
            raise ValueError(f"noise_multiplier must be >= 0, got {noise_multiplier}")
        self.noise_multiplier, self.sample_rate = float(noise_multiplier), float(sample_rate)
        self.planned_steps, self.delta = int(planned_steps), _check_delta(delta)
        self.accountant = _check_accountant_name(accountant)
        self._cache: dict[int, float] = {}
        self._dprv = None
        if self.noise_multiplier == 0:
            return
        self.orders, self.rdp_one = _rdp_one_step(self.sample_rate, self.noise_multiplier)
        eps_rdp_max = _rdp_epsilon(self.orders, self.rdp_one * self.planned_steps, self.delta)
        # Opacus' own rule (see accounting.py): relative PRV error at large ε, PRV skipped beyond PRV_MAX_EPSILON.
        self.eps_error = max(eps_error, 2e-3 * eps_rdp_max)
        if self.accountant == "prv" and eps_rdp_max <= PRV_MAX_EPSILON:
            self._dprv = self._discretise()

    def _discretise(self):
        steps, delta_error = self.planned_steps, self.delta / 1000  # Opacus' default δ error
        # Remark 5.6 (Gopi et al.), with the bounds opacus.accountants.analysis.prv.compute_safe_domain_size uses.
        size = max(_rdp_epsilon(self.orders, self.rdp_one * steps, delta_error / 4),
                   _rdp_epsilon(self.orders, self.rdp_one, delta_error / (8 * steps)))
        size = max(size, self.eps_error) + 3
        mesh = self.eps_error / np.sqrt(steps * np.log(12 / delta_error) / 2)
        domain = Domain.create_aligned(-size, size, mesh)
        prv = PoissonSubsampledGaussianPRV(self.sample_rate, self.noise_multiplier)
        with warnings.catch_warnings(), np.errstate(all="ignore"):
            warnings.simplefilter("ignore")
            return discretize(TruncatedPrivacyRandomVariable(prv, domain.t_min, domain.t_max), domain)

    def __call__(self, steps: int) -> float:
        """ε after ``steps`` steps (0 steps: 0.0; σ = 0: ∞). ``steps`` may not exceed ``planned_steps``."""
        if steps <= 0:
            return 0.0
        if self.noise_multiplier == 0:
            return math.inf
        if steps > self.planned_steps:
            raise ValueError(f"the curve was sized for {self.planned_steps} steps, asked for {steps}")
        if steps not in self._cache:
            self._cache[steps] = self._epsilon(steps)
        return self._cache[steps]

    def _epsilon(self, steps: int) -> float:
        eps_rdp = _rdp_epsilon(self.orders, self.rdp_one * steps, self.delta)
        if self._dprv is None:
            return eps_rdp
        with warnings.catch_warnings(), np.errstate(all="ignore"):
            warnings.simplefilter("ignore")
            try:
                composed = compose_heterogeneous(dprvs=[self._dprv], num_self_compositions=[steps])
                _, _, eps_prv = composed.compute_epsilon(self.delta, self.delta / 1000, self.eps_error)
            except (ValueError, FloatingPointError, RuntimeError):
                eps_prv = math.inf
        eps_prv = math.inf if math.isnan(eps_prv) else float(eps_prv)
        return min(eps_prv, eps_rdp)
