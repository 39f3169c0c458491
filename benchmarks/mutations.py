"""Mutation check of the privacy engine (``make mutations``): each named semantic mutation breaks one privacy claim
in a scratch copy of the repository, the tests that protect that claim run against the copy, and a table says
whether they caught it (killed) or not (survived). Nothing in this checkout is modified.

    python benchmarks/mutations.py                 # every mutation, prints the table
    python benchmarks/mutations.py --only zo-noise-bf16 --markdown

A mutation is (name, file, the exact text it replaces, the replacement, the pytest selection). The text must occur
exactly once in the file (checked), so a mutation that no longer applies is reported, never silently skipped.
"""
from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


@dataclass(frozen=True)
class Mutation:
    name: str
    claim: str
    path: str
    old: str
    new: str
    tests: tuple[str, ...]


MUTATIONS = (
    Mutation("public-mask-from-private-split", "the public update mask ranks public-split gradients",
             "toolkit/run_setup.py", 'public = make_vqa(c.task, "public",', "public = make_vqa(c.task, c.train_split,",
             ("tests/test_privacy_claims.py", "-k", "public_update_mask")),
    Mutation("audit-coins-from-answer-parity", "audit coins are independent of the canaries",
             "toolkit/audit/canaries.py", "return rng.random(len(canaries)) < 0.5",
             "return np.array([CANARY_ANSWERS.index(r.answer) % 2 == 0 for r in canaries])",
             ("tests/test_privacy_claims.py", "-k", "audit_coins")),
    Mutation("zo-noise-bf16", "DP-ZO's scalar noise is drawn in >= fp32",
             "toolkit/zo.py", "reference=torch.zeros(1, dtype=torch.float64)",
             "reference=torch.zeros(1, dtype=torch.bfloat16)",
             ("tests/test_privacy_claims.py", "-k", "dp_zo_scalar")),
    Mutation("adambc-phi-zero", "DP-AdamBC subtracts the run's noise variance",
             "toolkit/optimizers.py", "noise_variance(noise_multiplier, c.max_grad_norm, c.expected_batch_size)",
             "0.0", ("tests/test_privacy_claims.py", "-k", "adambc")),
    Mutation("accounting-per-accumulated-chunk", "a chunked batch is one step at the logical rate",
             "toolkit/privacy/engine.py", "sample_rate=self.sample_rate * optimizer.accumulated_iterations",
             "sample_rate=self.sample_rate * max(2, optimizer.accumulated_iterations)",
             ("tests/test_privacy_claims.py", "-k", "physical_chunks")),
    Mutation("cost-stats-released", "step time and peak memory are withheld under DP",
             "toolkit/privacy/release.py", 'return (not c.private) or bool(getattr(c, "release_cost_stats", False))',
             "return True", ("tests/test_privacy_release.py", "-k", "withhold")),
    Mutation("earlier-segment-forgotten", "a resumed run reports an earlier segment's noise_seed",
             "toolkit/privacy/release.py", "for segment in segments[:-1]:", "for segment in []:",
             ("tests/test_privacy_release.py", "-k", "earlier_segment")),
    Mutation("segments-not-checkpointed", "the checkpoint keeps every segment",
             "toolkit/train.py", "plan=run.plan, segments=segments)", "plan=run.plan, segments=[])",
             ("tests/test_privacy_release.py", "-k", "keeps_the_earlier")),
    Mutation("fixed-batches-from-public-seed", "fixed batches come from the secret generator",
             "toolkit/run_setup.py", "min(c.expected_batch_size, n_held), generator=generator)",
             "min(c.expected_batch_size, n_held), seed=c.seed)",
             ("tests/test_privacy_rules.py", "-k", "secret_generator")),
    Mutation("fixed-batches-unmarked", "fixed batches are named outside the Poisson accountant",
             "toolkit/privacy/release.py", 'if c.sampling == "fixed":', "if False:",
             ("tests/test_privacy_rules.py", "-k", "not_covered")),
    Mutation("delta-equal-to-one-over-n-accepted", "delta >= 1/N is refused",
             "toolkit/privacy/rules.py", "if delta >= limit:", "if delta > limit:",
             ("tests/test_privacy_rules.py", "-k", "one_over_n")),
    Mutation("batch-above-n-clamped", "a batch larger than N is refused",
             "toolkit/privacy/rules.py", "if expected_batch_size > n_records:", "if False:",
             ("tests/test_privacy_rules.py", "-k", "larger_than")),
    Mutation("secure-mode-no-reseed", "secure mode takes a fresh OS state before every noise draw",
             "toolkit/privacy/update_pruning.py", "reseed_from_os(self.generator)", "pass",
             ("tests/test_privacy_secure.py", "-k", "every_noise_draw")),
    Mutation("secure-mode-accepts-a-seed", "secure mode refuses a seed",
             "toolkit/config.py", "if c.private and c.secure_mode and c.noise_seed is not None:", "if False:",
             ("tests/test_privacy_secure.py", "-k", "refuses_a_seed")),
    Mutation("secret-generator-32-bit-seed", "secret generators hold 128 bits of entropy",
             "toolkit/secret_random.py",
             "return _set_mersenne_state(generator, sequence.generate_state(_MT_WORDS, dtype=np.uint32))",
             "return generator.manual_seed(int(sequence.generate_state(1)[0]))",
             ("tests/test_privacy_secure.py", "-k", "whole_state")),
    Mutation("pixel-duplicates-unchecked", "the same pixels under two training ids are refused",
             "toolkit/userdata.py", "records = check_training_images(records, refused)", "pass",
             ("tests/test_privacy_duplicates.py", "-k", "re_encoded")),
    Mutation("near-duplicates-silent", "near-duplicate pictures are warned about",
             "toolkit/image_duplicates.py", "for i, j, distance in near_pairs(hashes)]", "for i, j, distance in []]",
             ("tests/test_privacy_duplicates.py", "-k", "jpeg")),
    Mutation("train-eval-overlap-unreported", "an evaluation picture that is a training one is reported",
             "toolkit/image_duplicates.py", "if (digest := pixel_digest(img)) in by_pixels:", "if False:",
             ("tests/test_privacy_duplicates.py", "-k", "evaluation_picture")),
    Mutation("dp-noise-dropped", "DP-SGD adds its noise",
             "toolkit/privacy/update_pruning.py", "summed.add_(noise)", "summed.add_(noise * 0)",
             ("tests/test_privacy_run.py", "-k", "dp_sgd_noise_is_secret")),
    Mutation("fdp-audit-assumes-a-weaker-curve", "the f-DP audit rejects at most as often as its confidence allows",
             "toolkit/audit/fdp.py", "stats.norm.ppf(right) - mu))", "stats.norm.ppf(right) - 0.7 * mu))",
             ("tests/test_audit_fdp.py", "-k", "mu_gdp")),
    Mutation("audit-cli-ignores-its-schedule", "the README's audit command runs as written",
             "toolkit/cli/audit.py", "config_from_args(args, _AuditFlags)", "config_from_args(args, TrainConfig)",
             ("tests/test_audit_cli.py", "-k", "schedule")),
    Mutation("ghost-fp32-factors-in-bf16", "ghost-fp32 bounds each bf16 example by C in fp32",
             "toolkit/privacy/linear_grads.py",
             "factors = factors.to(device=g.device, dtype=dtype)",
             "factors = factors.to(device=g.device, dtype=g.dtype).to(dtype)",
             ("tests/test_ghost_fp32.py", "-k", "norm_at_most_C")),
    Mutation("ghost-fp32-noise-dropped", "ghost-fp32 adds N(0, σ²C²) to the clipped sum in the hooks",
             "toolkit/privacy/update_pruning.py",
             "block += self._draw_noise(std, block)", "block += 0 * self._draw_noise(std, block)",
             ("tests/test_ghost_fp32.py", "-k", "adds_noise")),
    Mutation("ghost-fp32-drift-unchecked", "ghost-fp32 refuses a second backward that drifts from the first",
             "toolkit/privacy/ghost_fp32.py", "if bool(drift.any()):", "if False:",
             ("tests/test_ghost_fp32.py", "-k", "drifts")),
    Mutation("ghost-fp32-bk-unclipped", "ghost-fp32-bk bounds each bf16 example by C in fp32 (one backward)",
             "toolkit/privacy/ghost_fp32.py", "factors = self._factors", "factors = torch.ones_like(self._factors)",
             ("tests/test_ghost_fp32.py", "-k", "norm_at_most_C")),
    Mutation("ghost-fp32-bk-kept-grads-unclipped",
             "ghost-fp32-bk bounds each example by C where it keeps per-example gradients (LoRA)",
             "toolkit/privacy/linear_grads.py", 'torch.einsum("b,boi->oi", factors, weight_grads[:, rows])',
             "weight_grads[:, rows].sum(0)", ("tests/test_ghost_fp32.py", "-k", "norm_at_most_C")),
)


def scratch_copy(destination: Path) -> None:
    """The tracked and untracked (not ignored) files of this checkout, copied to ``destination``."""
    listed = subprocess.run(["git", "ls-files", "-co", "--exclude-standard"], cwd=ROOT, capture_output=True,
                            text=True, check=True).stdout.splitlines()
    for name in listed:
        source = ROOT / name
        if source.is_file():
            target = destination / name
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, target)


def run_one(mutation: Mutation, scratch: Path, timeout: float) -> tuple[str, float]:
    """Apply ``mutation`` in ``scratch``, run its tests, restore the file; returns (outcome, seconds)."""
    target = scratch / mutation.path
    original = target.read_text()
    if original.count(mutation.old) != 1:
        return f"NOT APPLIED ({original.count(mutation.old)} matches)", 0.0
    target.write_text(original.replace(mutation.old, mutation.new))
    started = time.perf_counter()
    try:
        env = dict(os.environ, PYTHONPATH=str(scratch), PYTHONDONTWRITEBYTECODE="1")
        done = subprocess.run([sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider",
                               *mutation.tests], cwd=scratch, env=env, capture_output=True, text=True,
                              timeout=timeout)
        if done.returncode == 1:
            outcome = "killed"
        elif done.returncode == 0:
            outcome = "SURVIVED"
        else:  # 2-5: interrupted, internal error, usage error, nothing collected: the check itself is broken
            outcome = f"ERROR (pytest exit {done.returncode})"
    except subprocess.TimeoutExpired:
        outcome = "ERROR (timeout)"
    finally:
        target.write_text(original)
    return outcome, time.perf_counter() - started


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", nargs="*", help="names of the mutations to run (default: all)")
    parser.add_argument("--timeout", type=float, default=600, help="seconds per mutation")
    parser.add_argument("--markdown", action="store_true", help="print the table as markdown")
    args = parser.parse_args(argv)
    chosen = [m for m in MUTATIONS if not args.only or m.name in args.only]
    unknown = set(args.only or ()) - {m.name for m in MUTATIONS}
    if unknown:
        parser.error(f"unknown mutation(s): {', '.join(sorted(unknown))}")
    rows = []
    with tempfile.TemporaryDirectory(prefix="mutations-") as tmp:
        scratch = Path(tmp)
        scratch_copy(scratch)
        for mutation in chosen:
            outcome, seconds = run_one(mutation, scratch, args.timeout)
            rows.append((mutation, outcome, seconds))
            print(f"{mutation.name:38s} {outcome:10s} {seconds:6.1f} s", file=sys.stderr, flush=True)
    if args.markdown:
        print("| mutation | claim it breaks | file | tests | outcome |\n|---|---|---|---|---|")
        for m, outcome, _ in rows:
            print(f"| `{m.name}` | {m.claim} | `{m.path}` | `{' '.join(m.tests)}` | {outcome} |")
    else:
        for m, outcome, seconds in rows:
            print(f"{m.name:38s} {outcome:10s} {seconds:6.1f} s  {m.claim}")
    killed = sum(outcome == "killed" for _, outcome, _ in rows)
    print(f"{killed} of {len(rows)} mutations killed")
    return 0 if killed == len(rows) else 1


if __name__ == "__main__":
    sys.exit(main())
