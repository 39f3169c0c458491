"""Privacy accounting for Poisson-subsampled Gaussian steps, on Opacus' accountants.

Every private step of the toolkit (DP-SGD with or without update pruning, DP zeroth-order) is one
*sampled Gaussian mechanism*: each record joins the batch independently with probability ``q``, the
batch's summed per-record contributions (each bounded by ``C`` in L2 norm) get ``N(0, σ²C² I)`` noise.
Under add/remove-one-record adjacency, ``T`` such steps compose to an (ε, δ) guarantee that depends
only on ``(σ, q, T)`` — never on ``C``, the model, or the data. The accountant keeps that history as
a list of ``(σ, q, steps)`` triples and converts it to ε for a chosen δ.

Accountants (``ACCOUNTANTS``):

* ``"prv"`` (default): numerical composition of privacy-loss random variables (Gopi et al. 2021),
  tight. The value reported is ``min(PRV upper bound, RDP bound)``: both are valid upper bounds on
  the true ε, so their minimum is one too; the RDP bound only wins in the very-large-ε regime
  (ε ≳ 100) where PRV's discretisation is slow and loose. Beyond ε = ``PRV_MAX_EPSILON`` (by RDP)
  the PRV is not evaluated at all (it can take minutes there and return ∞).
* ``"rdp"``: Rényi DP (Mironov 2017) converted to (ε, δ), looser, fast.

A history with σ = 0 (a non-private step) has ε = ∞.

Example::

    >>> from toolkit.privacy.accounting import calibrate_noise, make_accountant, epsilon_spent
    >>> sigma = calibrate_noise(3.0, 1e-5, sample_rate=0.1, steps=100)
    >>> acc = make_accountant("prv")
    >>> for _ in range(100):
    ...     acc.step(noise_multiplier=sigma, sample_rate=0.1)
    >>> 2.98 <= epsilon_spent(acc, 1e-5) <= 3.0
    True
"""
from __future__ import annotations

import math
import warnings

import numpy as np
from opacus.accountants import create_accountant
from opacus.accountants.analysis.rdp import compute_rdp, get_privacy_spent
from opacus.accountants.utils import get_noise_multiplier

ACCOUNTANTS = ("prv", "rdp")

# Above this ε (by RDP) the PRV is not evaluated: its domain grows with ε and one evaluation can take
# minutes (and returns inf) at ε ~ 1e4, while RDP is a valid bound there and a guarantee that weak
# is not worth refining.
PRV_MAX_EPSILON = 1000.0
# Largest σ tried by calibration; a budget needing more is hopeless for training anyway.
MAX_NOISE_MULTIPLIER = 1e4


class PrivacyBudgetError(ValueError):
    """No noise multiplier in range reaches the requested (ε, δ) in the given number of steps."""


# ---------------------------------------------------------------- input checks

def _check_accountant_name(name: str) -> str:
    if name not in ACCOUNTANTS:
        raise ValueError(f"unknown accountant {name!r}; choose one of {ACCOUNTANTS}")
    return name


def _check_delta(delta: float) -> float:
    if not isinstance(delta, (int, float)) or not 0.0 < float(delta) < 1.0:
        raise ValueError(f"delta must be in (0, 1), got {delta!r}")
    return float(delta)


def _check_sample_rate(sample_rate: float) -> float:
    if not isinstance(sample_rate, (int, float)) or not 0.0 < float(sample_rate) <= 1.0:
        raise ValueError(f"sample_rate must be in (0, 1], got {sample_rate!r}")
    return float(sample_rate)


def _check_steps(steps: int) -> int:
    if isinstance(steps, bool) or not isinstance(steps, (int, np.integer)) or steps < 1:
        raise ValueError(f"steps must be an integer >= 1, got {steps!r}")
    return int(steps)


def _check_noise_multiplier(sigma: float) -> float:
    if not isinstance(sigma, (int, float)) or not float(sigma) >= 0.0 or math.isinf(sigma):
        raise ValueError(f"noise_multiplier must be a finite number >= 0, got {sigma!r}")
    return float(sigma)


def check_sampled_step(expected_batch_size: int, sample_rate: float, accountant: str) -> tuple[int, float]:
    """Validate what every private optimizer shares: the expected batch size, q, and the accountant's name."""
    if isinstance(expected_batch_size, bool) or not isinstance(expected_batch_size, int) or expected_batch_size < 1:
        raise ValueError(f"expected_batch_size must be an integer >= 1, got {expected_batch_size!r}")
    _check_accountant_name(accountant)
    return expected_batch_size, _check_sample_rate(sample_rate)


# ---------------------------------------------------------------- accountants

def make_accountant(name: str = "prv"):
    """A fresh Opacus accountant (``opacus.accountants.PRVAccountant`` / ``RDPAccountant``), empty history."""
    return create_accountant(mechanism=_check_accountant_name(name))


def _history_epsilon(history: list, delta: float, mechanism: str) -> float:
    """ε of a ``[(σ, q, steps), ...]`` history (see the module docstring for the PRV/RDP rule)."""
    if not history:
        return 0.0
    if any(float(sigma) == 0.0 for sigma, _, _ in history):
        return math.inf
    rdp = make_accountant("rdp")
    rdp.history = [tuple(h) for h in history]
    with warnings.catch_warnings(), np.errstate(all="ignore"):
        warnings.simplefilter("ignore")  # "optimal order is the largest alpha": the bound is still valid
        eps_rdp = float(rdp.get_epsilon(delta))
    if mechanism == "rdp" or eps_rdp > PRV_MAX_EPSILON:
        return eps_rdp
    prv = make_accountant("prv")
    prv.history = [tuple(h) for h in history]
    # Opacus' default absolute error 0.01 makes the mesh needlessly fine at large ε (10 s instead of
    # 0.3 s at ε ~ 100); a 0.2% relative error is invisible next to the 0.01 floor at ε ≤ 5.
    eps_error = max(0.01, 2e-3 * eps_rdp)
    with warnings.catch_warnings(), np.errstate(all="ignore"):
        warnings.simplefilter("ignore")  # PRV's numerics warn on log(0) in regions it then discards
        try:
            eps_prv = float(prv.get_epsilon(delta, eps_error=eps_error))
        except (ValueError, FloatingPointError, RuntimeError):
            eps_prv = math.inf  # PRV could not bound it; RDP still does
    if math.isnan(eps_prv):
        eps_prv = math.inf
    return min(eps_prv, eps_rdp)


def epsilon_spent(accountant, delta: float) -> float:
    """ε spent so far by ``accountant`` at ``delta``: 0.0 before any step, ∞ if any step had σ = 0."""
    delta = _check_delta(delta)
    return _history_epsilon(list(accountant.history), delta, accountant.mechanism())


def epsilon_for(noise_multiplier: float, sample_rate: float, steps: int, delta: float,
                accountant: str = "prv") -> float:
    """ε after ``steps`` Poisson steps at rate ``sample_rate`` with noise multiplier σ (no state)."""
    sigma = _check_noise_multiplier(noise_multiplier)
    return _history_epsilon([(sigma, _check_sample_rate(sample_rate), _check_steps(steps))],
                            _check_delta(delta), _check_accountant_name(accountant))


def calibrate_noise(target_epsilon: float, target_delta: float, sample_rate: float, steps: int,
                    accountant: str = "prv", epsilon_tolerance: float = 0.01) -> float:
    """The noise multiplier σ whose ε after ``steps`` Poisson steps at ``sample_rate`` is ≤ ``target_epsilon``.

    Never overshoots: the σ returned is one for which :func:`epsilon_for` (the same function the
    trainers report with) gives ``target_epsilon - epsilon_tolerance <= ε <= target_epsilon``, up to the
    PRV's own non-smoothness (then ε is a little lower, never higher). ``target_epsilon = inf`` means
    no privacy: σ = 0.0.

    The bracket comes from Opacus' ``get_noise_multiplier`` with the (fast) RDP accountant; for PRV a
    bisection follows, evaluating the PRV only at σ near the answer (PRV is slow at tiny σ).

    Raises:
        ValueError: ε ≤ 0, δ not in (0, 1), sample_rate not in (0, 1], steps < 1, unknown accountant.
        PrivacyBudgetError: even σ = ``MAX_NOISE_MULTIPLIER`` spends more than ``target_epsilon``.
    """
    if not isinstance(target_epsilon, (int, float)) or math.isnan(target_epsilon) or target_epsilon <= 0:
        raise ValueError(f"target_epsilon must be > 0 (or inf for no privacy), got {target_epsilon!r}")
    delta = _check_delta(target_delta)
    q = _check_sample_rate(sample_rate)
    steps = _check_steps(steps)
    _check_accountant_name(accountant)
    if not epsilon_tolerance > 0:
        raise ValueError(f"epsilon_tolerance must be > 0, got {epsilon_tolerance!r}")
    if math.isinf(target_epsilon):
        return 0.0
    key = (float(target_epsilon), delta, q, steps, accountant, float(epsilon_tolerance))
    if key not in _CALIBRATED:  # a pure function of its arguments: sweeps and tests repeat settings
        _CALIBRATED[key] = _calibrate(float(target_epsilon), delta, q, steps, accountant, epsilon_tolerance)
    return _CALIBRATED[key]


_CALIBRATED: dict[tuple, float] = {}


def _calibrate(target_epsilon: float, delta: float, q: float, steps: int, accountant: str,
               epsilon_tolerance: float) -> float:
    def eps(sigma: float) -> float:
        return _history_epsilon([(sigma, q, steps)], delta, accountant)

    # RDP bracket. get_noise_multiplier raises ValueError past σ = 1e6; translate to our error.
    try:
        with warnings.catch_warnings(), np.errstate(all="ignore"):
            warnings.simplefilter("ignore")
            sigma_rdp = float(get_noise_multiplier(target_epsilon=float(target_epsilon), target_delta=delta,
                                                   sample_rate=q, steps=steps, accountant="rdp",
                                                   epsilon_tolerance=epsilon_tolerance))
    except ValueError as err:
        raise PrivacyBudgetError(
            f"no noise multiplier reaches epsilon={target_epsilon} at delta={delta} with sample_rate={q} "
            f"over {steps} steps ({err})") from err
    if sigma_rdp > MAX_NOISE_MULTIPLIER:
        raise PrivacyBudgetError(
            f"epsilon={target_epsilon} at delta={delta} needs noise multiplier {sigma_rdp:.3g} "
            f"> {MAX_NOISE_MULTIPLIER:g} (sample_rate={q}, steps={steps}): the budget is too small")
    high, eps_high = sigma_rdp, eps(sigma_rdp)
    # Safety net: whatever the bracket says, only return a σ verified with the reporting function.
    while eps_high > target_epsilon:
        high *= 1.01
        eps_high = eps(high)
        if high > MAX_NOISE_MULTIPLIER:
            raise PrivacyBudgetError(f"epsilon={target_epsilon} is out of reach below σ={MAX_NOISE_MULTIPLIER:g}")
    if target_epsilon - eps_high <= epsilon_tolerance:
        return high
    # PRV is tighter than RDP, so its σ is lower: find a low end that overshoots, then bisect.
    low = high
    while True:
        low *= 0.8
        eps_low = eps(low)
        if eps_low > target_epsilon:
            break
        high, eps_high = low, eps_low
        if target_epsilon - eps_high <= epsilon_tolerance:
            return high
    return _bisect_sigma(eps, low, high, eps_high, target_epsilon, epsilon_tolerance)


def _bisect_sigma(eps, low: float, high: float, eps_high: float, target_epsilon: float,
                  epsilon_tolerance: float) -> float:
    """Bisect σ in [low, high], ``eps(low) > target >= eps(high) = eps_high`` (ε falls as σ grows), until
    ``eps(high)`` is within the tolerance below the target; return ``high``: a σ verified never to overshoot."""
    while target_epsilon - eps_high > epsilon_tolerance and (high - low) > 1e-6 * high:
        mid = 0.5 * (low + high)
        eps_mid = eps(mid)
        if eps_mid <= target_epsilon:
            high, eps_high = mid, eps_mid
        else:
            low = mid
    return high


# Integer Rényi orders only: their moments have a closed form (fast), and any set of orders gives a valid bound.
_ESTIMATE_ORDERS = tuple(range(2, 33)) + (40, 48, 64, 96, 128, 256)


def rdp_noise_estimate(target_epsilon: float, target_delta: float, sample_rate: float, steps: int) -> float:
    """A fast, conservative σ for *comparing* settings (the plan's batch-size proposal): the smallest σ on a
    log grid (bisection to 0.1 %) whose RDP bound over integer orders is ≤ ``target_epsilon``. RDP over fewer orders
    bounds ε from above, so this σ is at least what :func:`calibrate_noise` returns; never used to train."""
    delta = _check_delta(target_delta)
    q = _check_sample_rate(sample_rate)
    steps = _check_steps(steps)
    if not target_epsilon > 0:
        raise ValueError(f"target_epsilon must be > 0, got {target_epsilon!r}")

    def epsilon(sigma: float) -> float:
        with warnings.catch_warnings(), np.errstate(all="ignore"):
            warnings.simplefilter("ignore")   # "optimal order is the largest alpha": still a valid bound
            rdp = compute_rdp(q=q, noise_multiplier=sigma, steps=steps, orders=_ESTIMATE_ORDERS)
            return float(get_privacy_spent(orders=_ESTIMATE_ORDERS, rdp=rdp, delta=delta)[0])

    low, high = math.log(1e-3), math.log(MAX_NOISE_MULTIPLIER)
    if epsilon(math.exp(high)) > target_epsilon:
        raise PrivacyBudgetError(f"epsilon={target_epsilon} is out of reach below σ={MAX_NOISE_MULTIPLIER:g}")
    while high - low > 1e-3:
        mid = (low + high) / 2
        low, high = (mid, high) if epsilon(math.exp(mid)) > target_epsilon else (low, mid)
    return math.exp(high)


def history_epsilon(history: list, delta: float, accountant: str = "prv") -> float:
    """ε of a ``[(σ, q, steps), ...]`` history at ``delta`` (the composition of every entry)."""
    return _history_epsilon([(_check_noise_multiplier(float(s)), _check_sample_rate(float(q)), _check_steps(int(n)))
                             for s, q, n in history], _check_delta(delta), _check_accountant_name(accountant))


def calibrate_continuation(history: list, target_epsilon: float, target_delta: float, sample_rate: float,
                           steps: int, accountant: str = "prv", epsilon_tolerance: float = 0.01) -> float:
    """σ for ``steps`` more Poisson steps at ``sample_rate`` after ``history`` so that the *composition* of the
    past and the new steps stays ≤ ``target_epsilon`` (a resumed run given a new total budget).

    Adding steps only raises ε, so the σ of a fresh run of ``steps`` steps is a lower bound; bisection then
    evaluates the composed history with the same function the trainers report with, and only a σ verified
    to keep the total ≤ ``target_epsilon`` is returned.

    Raises:
        PrivacyBudgetError: the past alone already spends ``target_epsilon`` or more.
    """
    delta = _check_delta(target_delta)
    q = _check_sample_rate(sample_rate)
    steps = _check_steps(steps)
    _check_accountant_name(accountant)
    past = [(_check_noise_multiplier(float(s)), _check_sample_rate(float(r)), _check_steps(int(n)))
            for s, r, n in history]
    if math.isinf(target_epsilon):
        return 0.0
    spent = _history_epsilon(past, delta, accountant)
    if spent >= target_epsilon:
        raise PrivacyBudgetError(f"the resumed run has already spent epsilon={spent:.3f} >= the new target "
                                 f"{target_epsilon}: no further private step fits")
    if not past:
        return calibrate_noise(target_epsilon, delta, q, steps, accountant, epsilon_tolerance)

    def total(sigma: float) -> float:
        return _history_epsilon(past + [(sigma, q, steps)], delta, accountant)

    low = calibrate_noise(target_epsilon, delta, q, steps, accountant, epsilon_tolerance)
    high = low
    while total(high) > target_epsilon:
        high *= 2.0
        if high > MAX_NOISE_MULTIPLIER:
            raise PrivacyBudgetError(f"epsilon={target_epsilon} is out of reach below σ={MAX_NOISE_MULTIPLIER:g} "
                                     f"after the {spent:.3f} already spent")
    if high == low:
        return high
    return _bisect_sigma(total, low, high, total(high), target_epsilon, epsilon_tolerance)


# ---------------------------------------------------------------- save / restore

def accountant_state(accountant) -> dict:
    """A JSON-friendly copy of the accountant: ``{"mechanism", "history": [[σ, q, steps], ...]}``."""
    state = accountant.state_dict()  # Opacus' own: {"history", "mechanism"}
    return {"mechanism": state["mechanism"], "history": [[float(s), float(q), int(n)] for s, q, n in state["history"]]}


def resume_accountant(current, state: dict, required: tuple[str, ...], owner: str):
    """The accountant a resumed private optimizer continues with, from its saved ``state``.

    Shared by every private optimizer (DP-SGD engine, DP-ZO): refuses a ``current`` accountant that has already
    recorded steps (they would vanish from the accounting), a state missing any ``required`` key, and a
    checkpoint accounted with another mechanism.
    """
    if current.history:
        raise RuntimeError(f"load_state_dict must be called on a fresh {owner}, before any step: "
                           "otherwise steps already taken would vanish from the privacy accounting")
    for key in required:
        if key not in state:
            raise ValueError(f"{owner} state has no {key!r} entry (was it made by the {owner}'s state_dict?)")
    accountant = restore_accountant(state["accountant"])
    if accountant.mechanism() != current.mechanism():
        raise ValueError(f"the checkpoint was accounted with {accountant.mechanism()!r}, this {owner} uses "
                         f"{current.mechanism()!r}; build it with accountant={accountant.mechanism()!r}")
    return accountant


def restore_accountant(state: dict):
    """Rebuild an accountant from :func:`accountant_state`; a resumed run keeps every past step.

    Raises:
        ValueError: the state is malformed (so a resumed run never silently starts from ε = 0).
    """
    if not isinstance(state, dict) or "mechanism" not in state or "history" not in state:
        raise ValueError("accountant state must be a dict with 'mechanism' and 'history' (see accountant_state)")
    accountant = make_accountant(state["mechanism"])
    history = []
    for entry in state["history"]:
        if len(entry) != 3:
            raise ValueError(f"accountant history entries are (sigma, sample_rate, steps), got {entry!r}")
        sigma, q, n = entry
        history.append((_check_noise_multiplier(float(sigma)), _check_sample_rate(float(q)), _check_steps(int(n))))
    accountant.load_state_dict({"mechanism": state["mechanism"], "history": history})
    return accountant

