"""The Audit tab: one training run with canaries (``toolkit.audit.run_audit``, Steinke, Nasr & Jagielski 2023) and
the empirical ε lower bound it yields, next to the ε the accountant reports, with what that does and does not prove.

The audited run uses ``toolkit.audit.AUDIT_DEFAULTS`` (a small, untrained-start schedule under which the audit has
power on the tiny preset); the method and ε are the user's. Every audit of the session is kept for the figure.
"""
from __future__ import annotations

import math
from typing import Iterator

import gradio as gr

from toolkit.audit import AUDIT_DEFAULTS, audit_figure, run_audit
from toolkit.config import TrainConfig
from toolkit.dashboard import jobs
from toolkit.dashboard.tabs import runs as session_runs
from toolkit.dashboard.common import (
    METHOD_CHOICES, AppSettings, InputError, message_html, routed, ui_choice, ui_integer, ui_number,
    warn,
)
from toolkit.vocabulary import METHOD_LABELS, METHODS, format_epsilon

MAX_CANARIES = 512
AUDIT_DATA = "embedded, {n} records + {m} canaries"
WHAT_IT_PROVES = ("A lower bound above the reported ε proves a leak (a bug, at 95 % confidence); a lower bound below "
                  "it proves nothing about privacy: one run with {m} canaries can never show more than ε ≈ "
                  "{ceiling:.2f}, and weaker leaks go unseen.")
HELP = dict(
    method="The method under audit.",
    epsilon="The ε the run targets (> 0; 'inf' for DP-SGD without noise, a run that leaks by design).",
    canaries="Canary records m (2 to 512), each joining the training set on a secret coin flip; k = m / 8 guesses "
             "per side.",
)


def parse_audit_epsilon(value) -> float:
    text = str(value).strip().lower()
    if text in ("inf", "∞", "infinity"):
        return math.inf
    return ui_number("ε", value, minimum=0, hint="or 'inf' for no noise")


def audit(settings: AppSettings, method, epsilon, canaries, session: str = "local") -> Iterator[dict]:
    """Generator: one audited run. Yields ``status``, and at the end ``verdict`` (Markdown: reported ε, lower
    bound, ceiling, guesses, what it proves) and ``summary`` (the audit's JSON-ready record, for the figure)."""
    blank = dict(verdict="")
    try:
        ui_choice("method", method, [m for m in METHODS if m != "non-private"])
        eps = parse_audit_epsilon(epsilon)
        m = ui_integer("canaries", canaries, minimum=2, maximum=MAX_CANARIES)
        config = TrainConfig(method=method, epsilon=eps, preset=settings.preset, progress=False, **AUDIT_DEFAULTS)
        try:
            config.resolved()
        except ValueError as err:
            raise InputError(str(err)) from None
        job = jobs.claim(session, "privacy audit", cancellable=False, units=AUDIT_DEFAULTS["steps"],
                         pace_key=f"privacy audit on {settings.preset}")
    except InputError as err:
        yield dict(blank, status=warn(f"Not started: {err}"))
        return
    label = f"{METHOD_LABELS[method]}, ε = {format_epsilon(eps)}"

    def render() -> dict:
        return dict(blank, status=message_html(f"Auditing {label}: one run of {AUDIT_DEFAULTS['steps']} steps with "
                                               f"{m} canaries ({job.elapsed():.0f} s)…"))

    outcome = yield from jobs.stream(job, lambda job: run_audit(config, canaries=m), render, blank=blank,
                                     first_status=message_html(f"Auditing {label}…"))
    failed = jobs.unfinished_html(outcome, job, "The audit")
    if failed:
        yield dict(blank, status=failed)
        return
    result = outcome.value
    yield dict(status=message_html(f"Audited {label} in {result.wall_time_s:.0f} s.",
                                   "error" if result.violation else "ok"),
               verdict=verdict_markdown(result.summary()), summary=result.summary())


def verdict_markdown(s: dict) -> str:
    """The lower bound next to the reported ε, and one sentence on what a lower bound does and does not prove."""
    reported = s["epsilon_reported"]
    verdict = ("**VIOLATION: the run leaks more than its reported ε.**" if s["violation"] else
               "No violation found: the bound stays at or below the reported ε.")
    rows = [("ε reported by the accountant", format_epsilon(reported, 3) if math.isfinite(reported) else "∞"),
            ("empirical ε lower bound (95 %)", f"{s['epsilon_lower_bound']:.3f}"),
            ("audit ceiling (every guess right)", f"{s['epsilon_ceiling']:.3f}"),
            ("f-DP lower bound (95 %, Gaussian curve; 'in' guesses)",
             f"{s.get('fdp_epsilon_lower_bound', 0.0):.3f} (ceiling {s.get('fdp_epsilon_ceiling', 0.0):.3f}; "
             f"{s.get('fdp_correct', 0)} of {s.get('fdp_guesses', 0)} right)"),
            ("membership guesses right", f"{s['correct']} of {s['guesses']} ({s['canaries']} canaries)"),
            ("accuracy of the audited run", "n/a" if math.isnan(s["accuracy"]) else f"{100 * s['accuracy']:.1f}%")]
    lines = [verdict, "", "| | |", "|---|---|"] + [f"| {k} | {v} |" for k, v in rows]
    lines += ["", WHAT_IT_PROVES.format(m=s["canaries"], ceiling=s["epsilon_ceiling"])]
    if s["epsilon_ceiling"] <= 0:
        lines += ["", f"**This audit had no power:** with {s['canaries']} canaries even all {s['guesses']} guesses "
                      "right cannot rule out ε = 0 at 95 % confidence. Use more canaries (128 is the default)."]
    return "\n".join(lines)


def build(settings: AppSettings, runs_state: gr.State) -> list:
    """The Audit tab (inside the app's ``gr.Blocks``); the audit starts from an untrained model (no warm start).
    Each audited run is added to ``runs_state`` (the session's runs)."""
    s = settings
    with gr.Tab("Audit", id="audit"):
        audits = gr.State([])
        with gr.Row():
            with gr.Column(scale=2):
                gr.Markdown(f"An empirical check of the privacy accounting: {AUDIT_DEFAULTS['steps']} steps of "
                            f"batch {AUDIT_DEFAULTS['expected_batch_size']} on {AUDIT_DEFAULTS['train_limit']} "
                            "records plus canaries, from an untrained model (where this one-run attack has power).")
                method = gr.Radio([c for c in METHOD_CHOICES if c[1] != "non-private"], value="dp-sgd",
                                  label="Method", info=HELP["method"], elem_id="au-method")
                with gr.Row():
                    epsilon = gr.Textbox("1", label="ε (epsilon)", info=HELP["epsilon"], elem_id="au-epsilon")
                    canaries = gr.Number(128, precision=0, label="Canaries", info=HELP["canaries"],
                                         elem_id="au-canaries")
                with gr.Row():
                    run_button = gr.Button("Audit", variant="primary", elem_id="au-run")
                    cancel_button = gr.Button("Cancel while queued", variant="stop", elem_id="au-cancel")
            with gr.Column(scale=3):
                status = gr.HTML(message_html("Press Audit: one run, then the ε lower bound next to the reported ε."),
                                 elem_id="au-status")
                verdict = gr.Markdown(elem_id="au-verdict")
                figure = gr.Plot(label="Reported ε vs the audit's lower bound (this session)", elem_id="au-figure")
    outputs = dict(status=status, verdict=verdict)

    def run(method_v, eps_v, canaries_v, audits_v, runs_v, request: gr.Request):
        for update in audit(s, method_v, eps_v, canaries_v, session=jobs.session_id(request)):
            summary = update.pop("summary", None)
            shown = routed(update, outputs)
            if summary is not None:
                audits_v = list(audits_v or []) + [summary]
                shown[audits] = audits_v
                shown[figure] = audit_figure(audits_v)
                runs_v = list(runs_v or [])
                shown[runs_state] = runs_v + [session_runs.run_from_audit(
                    summary, session_runs.next_number(runs_v), AUDIT_DATA.format(n=AUDIT_DEFAULTS["train_limit"],
                                                                                 m=summary["canaries"]))]
            yield shown

    jobs.wire_run_button(run_button, run, [method, epsilon, canaries, audits, runs_state],
                         list(outputs.values()) + [audits, figure, runs_state], api_name="audit")
    cancel_button.click(jobs.cancel_from_page, None, status, concurrency_limit=None, show_progress="hidden",
                        api_name=False)
    return []
