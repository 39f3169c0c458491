"""A plan before training: what a config's privacy budget buys, in a second, without loading the model.

``plan(config)`` reads only the config and the size of the training data (the embedded task's split size, or
the records / users of a LLaVA JSON file, counted without opening an image) and answers:

* N (records, or users with user-level DP), the Poisson rate q = B / N, the steps, σ calibrated by the toolkit's
  own accountant (:func:`toolkit.privacy.calibrate_noise`, the one ``train`` uses) and the ε and δ it reaches;
* the noise of the averaged update against the clipped signal: each step adds ``N(0, σ²C²)`` per coordinate to
  a sum of at most B contributions of norm ≤ C, then divides by B, so the noise's standard deviation is
  ``σ·C / B`` next to a signal of norm at most ``C``. The *noise ratio* ``σ / B`` is their quotient;
* a verdict from a **measured** calibration table (``toolkit/measured/plan_calibration.json``, written by
  ``benchmarks/calibrate_plan.py``): did the measured runs at this noise ratio learn, or stay at the majority
  class, and how many runs say so;
* a proposal: the batch size (and steps, at the same compute B·T) with the smallest noise ratio for the same ε.

Example::

    >>> from toolkit.config import TrainConfig
    >>> p = plan(TrainConfig(method="dual-priv", epsilon=3.0, steps=30, expected_batch_size=64))
    >>> p.unit, p.steps, p.epsilon_reached <= 3.0
    ('record', 30, True)
"""
from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from toolkit.config import TrainConfig, planned_steps
from toolkit.methods import get_method
from toolkit.privacy.accounting import PrivacyBudgetError, calibrate_noise, epsilon_for, rdp_noise_estimate
from toolkit.privacy.rules import check_private_run, declared_units
from toolkit.privacy.user_level import unit_words

CALIBRATION_PATH = Path(__file__).resolve().parent / "measured" / "plan_calibration.json"
MIN_PROPOSED_STEPS = 30   # the calibration runs' length: fewer steps are outside what was measured
BATCH_GRID = (8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096)


@dataclass
class Plan:
    """What a config's budget buys (see the module docstring). ``line()`` is the one-line verdict."""

    method: str
    private: bool
    unit: str                      # "record" or "user"
    unit_sentence: str             # what ε protects, in words
    n: int                         # records (or users) the sampling rate is computed from
    expected_batch_size: int
    sample_rate: float
    steps: int
    epsilon: float | None          # the target (None: non-private)
    delta: float | None
    noise_multiplier: float
    epsilon_reached: float | None
    max_grad_norm: float
    noise_std: float               # σ·C / B: the averaged update's noise per coordinate
    noise_ratio: float             # σ / B: that noise in units of the clipped signal's bound C
    verdict: str
    evidence: dict = field(default_factory=dict)
    proposal: dict | None = None
    seconds: float = 0.0
    n_counted: str = ""            # how N was found, where it may differ from the N train will use

    def line(self) -> str:
        """The one-line verdict ``train`` prints before it starts."""
        if not self.private:
            return f"plan: non-private, N = {self.n} records{self._n_note()}, {self.steps} steps of {self.expected_batch_size}: " \
                   f"{self.verdict}"
        return (f"plan: {self.method}, N = {self.n} {self.unit}s{self._n_note()}, q = {self.sample_rate:.3g}, {self.steps} steps, "
                f"σ = {self.noise_multiplier:.3g}, ε = {_fmt(self.epsilon_reached)} at δ = {self.delta:g}; "
                f"noise σ·C/B = {self.noise_std:.3g} vs signal ≤ C = {self.max_grad_norm:g} "
                f"(ratio {self.noise_ratio:.3g}): {self.verdict}")

    def _n_note(self) -> str:
        return f" ({self.n_counted})" if self.n_counted else ""

    def to_dict(self) -> dict:
        out = asdict(self)
        out["line"] = self.line()
        return {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in out.items()}


def _fmt(x) -> str:
    return "∞" if x is None or (isinstance(x, float) and math.isinf(x)) else f"{x:.3g}"


# ------------------------------------------------------------------------------------------ the calibration table

def summarize_calibration(rows: list[dict]) -> dict:
    """The published table: one entry per (task, N, ε) with its noise ratio, accuracy (mean, s.d.) and how many
    of its runs beat the majority class; ``rows`` are the per-run records of ``benchmarks/calibrate_plan.py``."""
    groups: dict[tuple, list] = {}
    for row in rows:
        groups.setdefault((row["task"], row["n"], row["epsilon"], row["steps"], row["expected_batch_size"]),
                          []).append(row)
    cells = []
    for (task, n, epsilon, steps, batch), runs in sorted(groups.items(), key=lambda kv: (
            kv[0][0], kv[0][1], -(kv[0][2] if kv[0][2] is not None else math.inf))):
        accs = [r["accuracy"] for r in runs]
        mean = sum(accs) / len(accs)
        sd = math.sqrt(sum((a - mean) ** 2 for a in accs) / (len(accs) - 1)) if len(accs) > 1 else None
        cells.append(dict(task=task, n=n, epsilon=epsilon, steps=steps, expected_batch_size=batch,
                          noise_ratio=runs[0]["noise_ratio"], accuracy_mean=round(mean, 4),
                          accuracy_sd=None if sd is None else round(sd, 4), runs=len(runs),
                          learned=sum(bool(r["learned"]) for r in runs), majority=runs[0]["majority"],
                          eval_records=runs[0]["eval_records"], seeds=sorted(r["seed"] for r in runs)))
    return dict(cells=cells, runs=len(rows))


def load_calibration(path: str | Path | None = None) -> dict:
    """The published calibration table (empty when none was measured yet). A file that exists but is not a
    table is an error naming it, not an empty table: the plan would otherwise say "no calibration" silently."""
    path = Path(path) if path else CALIBRATION_PATH
    if not path.is_file():
        return dict(cells=[], runs=0)
    try:
        table = json.loads(path.read_text())
    except ValueError as err:
        raise ValueError(f"calibration table {str(path)!r} is not valid JSON ({err})") from None
    if not isinstance(table, dict) or not isinstance(table.get("cells"), list):
        raise ValueError(f"calibration table {str(path)!r} has no list of 'cells'")
    return table


# ------------------------------------------------------------------------------------------ the data's size

def count_units(c: TrainConfig) -> tuple[int, str, str]:
    """(N, unit, how N was counted): the records of the training data, or its distinct users for user-level DP;
    the JSON is read, no image is opened. ``dataset_size`` (a declared size) wins, as in ``train``."""
    unit = c.privacy_unit
    units = "users" if unit == "user" else "records"
    if c.train_data:
        from toolkit.userdata import read_records   # the JSON only: no image is opened
        raw = read_records(Path(c.train_data))
        if c.train_limit is not None:
            raw = raw[:c.train_limit]
        n = len({str(r.get("user_id")) for r in raw if isinstance(r, dict)}) if unit == "user" else len(raw)
        if n < 1:
            raise ValueError(f"{c.train_data} holds no training {units}"
                             f"{' within train_limit' if c.train_limit is not None else ''}")
        # validation (which opens every image) may refuse some: train's N is the accepted count, which the
        # dashboard declares as dataset_size; so only the embedded tasks' exact N is held against a declared size
        if c.dataset_size is not None:
            return c.dataset_size, unit, ""
        return n, unit, f"{units} in the file before validation; train counts the {units} it accepts"
    from toolkit.data import dataset_sizes
    n = dataset_sizes()[c.task][c.train_split]
    if c.train_limit is not None:
        n = min(n, c.train_limit)
    return declared_units(c.dataset_size, n, units), unit, ""


def unit_sentence(c: TrainConfig, unit: str) -> str:
    """What ε protects, in words."""
    if not c.private:
        return "nothing: a non-private run adds no noise and has no guarantee, whatever ε is set"
    if not math.isfinite(float(c.epsilon)):
        return "nothing: ε = ∞ adds no noise, so no record is protected"
    eps = _fmt(float(c.epsilon))
    if unit == "user":
        return unit_words(eps, c.user_records_per_step)
    return f"ε = {eps} protects one record (one image); a person with several images is protected per image only"


# ------------------------------------------------------------------------------------------ the plan

def plan(config: TrainConfig, calibration: dict | None = None, propose: bool = True) -> Plan:
    """The plan of ``config`` (resolved here); see the module docstring. No model is built, no image read."""
    started = time.perf_counter()
    c = config.resolved()
    n, unit, n_counted = count_units(c)
    batch = c.expected_batch_size
    q = check_private_run(c, n)   # train's rules: δ < 1/N and a batch within N, refused here as there
    steps = planned_steps(c, q)
    table = calibration if calibration is not None else load_calibration()
    if not c.private:
        verdict, evidence = _verdict(0.0, steps, table)
        return Plan(c.method, False, unit, unit_sentence(c, unit), n, batch, q, steps, None, None, 0.0, None,
                    c.max_grad_norm, 0.0, 0.0, "no noise, no guarantee; " + verdict, evidence, None,
                    time.perf_counter() - started, n_counted)
    sigma = _sigma(c.epsilon, c.delta, q, steps, c.accountant)
    reached = epsilon_for(sigma, q, steps, c.delta, c.accountant) if sigma > 0 else math.inf
    ratio = sigma / batch
    if get_method(c.method).noise == "gradient":
        verdict, evidence = _verdict(ratio, steps, table)
    else:   # the table's runs noised a clipped gradient; a zeroth-order update's noise is another quantity
        verdict, evidence = (f"no calibration for {c.method}: the measured runs noised a clipped gradient "
                             f"({table.get('recipe', {}).get('method', 'dual-priv')}); its noise ratio is not "
                             "comparable", dict(runs=0))
    proposal = _proposal(c, n, batch, steps, ratio, table) if propose and math.isfinite(c.epsilon) else None
    return Plan(c.method, True, unit, unit_sentence(c, unit), n, batch, q, steps, float(c.epsilon), c.delta, sigma,
                reached, c.max_grad_norm, sigma * c.max_grad_norm / batch, ratio, verdict, evidence, proposal,
                time.perf_counter() - started, n_counted)


def _sigma(epsilon: float, delta: float, q: float, steps: int, accountant: str) -> float:
    if not math.isfinite(epsilon):
        return 0.0
    try:
        return calibrate_noise(epsilon, delta, q, steps, accountant=accountant)
    except PrivacyBudgetError as err:
        raise ValueError(f"no noise level reaches ε = {epsilon:g} in {steps} steps at q = {q:.3g}: {err}") from None


def _example(cell: dict) -> str:
    """One measured cell in words: its task and size (the runs may be of another task than yours), noise ratio,
    and accuracy against its majority class."""
    return (f"{cell['task']} task, N = {cell['n']}, ratio {cell['noise_ratio']:.3g}: {100 * cell['accuracy_mean']:.0f}% vs "
            f"{100 * cell['majority']:.0f}%")


def _verdict(ratio: float, steps: int, table: dict) -> tuple[str, dict]:
    """Where ``ratio`` falls among the measured cells: learned at a noise at least this high, or stayed at the
    majority class at a noise at most this high; the cells and run counts behind it."""
    cells = table.get("cells", [])
    if not cells:
        return "no calibration measured yet (run benchmarks/calibrate_plan.py)", dict(runs=0)
    learned = [x for x in cells if x["noise_ratio"] >= ratio and x["learned"] == x["runs"]]
    stuck = [x for x in cells if x["noise_ratio"] <= ratio and x["learned"] == 0]
    runs_total = sum(x["runs"] for x in cells)
    where = f"calibration: {runs_total} runs, {cells[0]['steps']} steps, {cells[0]['task']} task"
    caveat = f"; you plan {steps} steps, the runs had {cells[0]['steps']}" if steps < cells[0]["steps"] else ""
    if stuck and not learned:
        worst = min(stuck, key=lambda x: x["noise_ratio"])
        runs = sum(x["runs"] for x in stuck)
        return (f"runs at this noise level or lower (ratio ≤ {ratio:.3g}) stayed at the majority class "
                f"({runs} of {runs} runs; e.g. {_example(worst)}){caveat}",
                dict(kind="stuck", runs=runs, cells=stuck, source=where))
    if learned and not stuck:
        best = max(learned, key=lambda x: x["noise_ratio"])
        runs = sum(x["runs"] for x in learned)
        return (f"runs at this noise level or higher (ratio ≥ {ratio:.3g}) learned ({runs} of {runs} runs beat the "
                f"majority class by > 2 s.e.; e.g. {_example(best)}){caveat}",
                dict(kind="learned", runs=runs, cells=learned, source=where))
    near = sorted(cells, key=lambda x: abs(math.log((x["noise_ratio"] + 1e-6) / (ratio + 1e-6))))[:2]
    said = "; ".join(f"ratio {x['noise_ratio']:.3g}: {x['learned']} of {x['runs']} runs learned "
                     f"({100 * x['accuracy_mean']:.0f}%)" for x in near)
    return (f"between measured levels, uncertain (nearest: {said}){caveat}",
            dict(kind="uncertain", runs=sum(x["runs"] for x in near), cells=near, source=where))


def _proposal(c: TrainConfig, n: int, batch: int, steps: int, ratio: float, table: dict) -> dict | None:
    """The batch size (steps = compute / batch, at least MIN_PROPOSED_STEPS) with the smallest noise ratio for the
    same ε at the same compute (records processed, B·T). Every option, the config's own included, is ranked with
    the same fast RDP estimate (:func:`toolkit.privacy.accounting.rdp_noise_estimate`, an upper bound on σ), so
    the comparison is like for like and the plan stays quick; the proposal's σ is that estimate."""
    compute = batch * steps
    options = []
    for b in sorted({batch, *(x for x in BATCH_GRID if batch // 4 <= x <= batch * 8)}):
        t = compute // b
        if b > n or t < min(MIN_PROPOSED_STEPS, steps):
            continue
        try:
            options.append((rdp_noise_estimate(c.epsilon, c.delta, b / n, t) / b, b, t))
        except PrivacyBudgetError:   # this batch size cannot reach ε at this compute: not an option
            continue
    if not options:
        return None
    best_ratio, b, t = min(options)
    if b == batch:
        return dict(expected_batch_size=batch, steps=steps, noise_ratio=ratio, same_as_config=True,
                    effect="your batch size already has the smallest noise for this ε at this compute")
    own = next((r for r, bb, _ in options if bb == batch), ratio)
    verdict, _ = _verdict(best_ratio, t, table)
    return dict(expected_batch_size=b, steps=t, noise_multiplier=best_ratio * b, noise_ratio=best_ratio,
                same_as_config=False, accountant="rdp estimate (an upper bound on σ)",
                effect=f"noise ratio {own:.3g} -> {best_ratio:.3g} (both by the same RDP estimate) at the same "
                       f"compute ({compute} records processed) and the same ε; {verdict}")
