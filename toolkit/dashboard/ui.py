"""The Gradio Blocks of the dashboard: components, help texts, and the wiring to :mod:`toolkit.dashboard.handlers`."""
import os

import gradio as gr

from toolkit.dashboard import handlers as h
from toolkit.dashboard.handlers import AppSettings

HEAVY = "heavy-jobs"  # fine-tunes, measurements and sweeps share one queue slot: they never run at once

HELP = dict(
    method=("Non-private: no noise (ε = ∞). DP-SGD: per-example clipping + Gaussian noise, every visual token. "
            "Dual-Priv: DP-SGD + visual token pruning + update pruning. DP-ZO: zeroth-order, two forward passes, "
            "memory near inference, lower utility."),
    epsilon=(f"Privacy budget ε of the whole run (> 0): smaller = stronger privacy, more noise. Privacy unit: "
             f"{h.PRIVACY_UNIT}. Ignored by non-private."),
    delta="δ in (0, 1): the chance the ε bound may fail; keep it well below 1 / number of records (700).",
    budget_mode="Give the visual-token budget as a fraction removed or as the number of tokens fed to the LLM.",
    token_prune_ratio=("Fraction of the image's visual tokens removed before the LLM, in [0, 1): 0.75 keeps 16 of "
                       "64 patches ([CLS] + dominant patches + fused contextual tokens for dual-priv)."),
    keep_tokens="Visual tokens fed to the LLM per image (1 to the number of patches: 64 for the tiny preset).",
    token_strategy=("How visual tokens are chosen. auto: dual-priv for Dual-Priv, every token for the other "
                    "methods. dual-priv: the patches [CLS] attends to most + contextual tokens fused from the rest; "
                    "random / uniform / pool / divprune / mean-attention: baselines; none: every token."),
    grad_prune_ratio=("Dual-Priv only: fraction of the noisy gradient's coordinates with the smallest magnitude set "
                      "to zero after the noise is added (post-processing: costs no privacy), in [0, 1)."),
    fusion_noise=("Add Gaussian noise to the fused contextual tokens, σ matched to the DP noise. A heuristic OUTSIDE "
                  "the DP guarantee: ε does not change with it (the guarantee comes from DP-SGD's gradient noise)."),
    steps="Optimizer steps; this app allows at most {max_steps}, and stops a run after {time_limit:g} s.",
    batch_size="Expected batch size (Poisson sampling for private methods: each record joins a step with "
               "probability batch / records).",
    lr="Learning rate; leave empty for the method's default (5e-3 DP-SGD/Dual-Priv, 1e-3 non-private, 2e-3 DP-ZO).",
    tok_strategy=("dual-priv: the patches [CLS] attends to most + contextual tokens fused from the rest; random / "
                  "uniform / pool / divprune / mean-attention: baselines; none: every token."),
    example="Index of an image in the embedded digit test split (0 to {last}).",
    upload="Or upload an image (PNG, JPEG, ...): it is resized to the model's input; it overrides the example.",
    bench_methods="Methods measured side by side on the same model and batch.",
    bench_steps="Steps per method (at least 3: one warm-up, one profiled for memory, the rest timed).",
    bench_batch="Records in the measured batch (the same for every method).",
    sweep_methods="Methods of the sweep; non-private runs once per seed (ε = ∞).",
    sweep_eps="Comma-separated ε values, each > 0 (e.g. 1, 3, 8).",
    sweep_seeds="Seeds per (method, ε): the curve shows their mean and spread (1 to 5).",
    sweep_steps="Steps of every run of the sweep.",
    sweep_csv="A CSV with columns method, epsilon, seed, accuracy (as written by a toolkit sweep).",
)

CSS = """
.dp-msg {padding: 6px 10px; border-radius: 6px; margin: 2px 0;}
.dp-error {background: #fde8e8; color: #9b1c1c; border: 1px solid #f8b4b4; font-weight: 600;}
.dp-warn {background: #fdf6b2; color: #723b13;}
.dp-ok {background: #def7ec; color: #03543f;}
.dp-info {background: #e1effe; color: #1e429f;}
.dp-progress progress {width: 60%; height: 14px; vertical-align: middle;}
.dp-progress span {margin-left: 8px;}
"""


def _session(request) -> str:
    return getattr(request, "session_hash", None) or "local"


def settings_from_env(**overrides) -> AppSettings:
    """App settings from ``DUALPRIV_APP_*`` environment variables, then explicit overrides."""
    def env(name, cast):
        value = os.environ.get(f"DUALPRIV_APP_{name}")
        return cast(value) if value not in (None, "") else None

    values = dict(warm_start_steps=env("WARM_START_STEPS", int), train_limit=env("TRAIN_LIMIT", int),
                  eval_limit=env("EVAL_LIMIT", int))
    isolate = os.environ.get("DUALPRIV_APP_BENCH_ISOLATE")
    if isolate not in (None, ""):
        values["bench_isolate"] = isolate.lower() not in ("0", "false", "no", "off")
    values = {k: v for k, v in values.items() if v is not None}
    values.update({k: v for k, v in overrides.items() if v is not None})
    return AppSettings(**values)


def build_app(max_steps: int = 200, time_limit: float = 600.0, preset: str = "tiny",
              warm_start_steps: int | None = None, settings: AppSettings | None = None, **options):
    """The dashboard as a ``gr.Blocks`` (queue enabled, one heavy job at a time).

    ``warm_start_steps=0`` (or ``DUALPRIV_APP_WARM_START_STEPS=0``) skips the public warm start (tests);
    other ``options`` are :class:`AppSettings` fields (``train_limit``, ``eval_limit``, ``bench_isolate``, ...).
    """
    from toolkit.tokens import STRATEGIES

    if settings is None:
        settings = settings_from_env(max_steps=max_steps, time_limit=time_limit, preset=preset,
                                     warm_start_steps=warm_start_steps, **options)
    s = settings
    n_examples = h.example_count(s)
    n_patches = h.geometry_bundle(s.preset).n_patches
    strategies = sorted(STRATEGIES)
    budget_modes = [h.BUDGET_RATIO, h.BUDGET_KEEP]
    method_choices = [(h.METHOD_LABELS[m], m) for m in h.METHODS]

    # delete_cache: files the app created (uploads, downloads) older than a day are removed every hour
    with gr.Blocks(title="Dual-Priv Pruning dashboard", analytics_enabled=False,
                   delete_cache=(3600, 86400)) as demo:
        def header() -> str:
            return ("# Dual-Priv Pruning: differentially private fine-tuning of a LLaVA-style model\n"
                    f"Embedded task: **{s.task}** on handwritten digits; {h.warm_start_note(s)}. "
                    f"Privacy unit: **{h.PRIVACY_UNIT}**, so ε bounds what a run reveals about any single image. "
                    f"Jobs are limited to {s.max_steps} steps and {s.time_limit:g} s, and queue one at a time.")

        heading = gr.Markdown(header(), elem_id="header")

        # ---------------------------------------------------------------- fine-tune
        with gr.Tab("Fine-tune", id="finetune"):
            with gr.Row():
                with gr.Column(scale=2):
                    method = gr.Radio(method_choices, value="dual-priv", label="Method", info=HELP["method"],
                                      elem_id="ft-method")
                    with gr.Row():
                        epsilon = gr.Number(3.0, label="ε (epsilon)", info=HELP["epsilon"], elem_id="ft-epsilon")
                        delta = gr.Number(1e-5, label="δ (delta)", info=HELP["delta"], elem_id="ft-delta")
                    token_strategy = gr.Dropdown([h.AUTO_STRATEGY] + strategies, value=h.AUTO_STRATEGY,
                                                 label="Token strategy", info=HELP["token_strategy"],
                                                 elem_id="ft-strategy")
                    budget_mode = gr.Radio(budget_modes, value=h.BUDGET_RATIO, label="Token budget given as",
                                           info=HELP["budget_mode"], elem_id="ft-budget-mode")
                    with gr.Row():
                        token_ratio = gr.Number(0.75, label="Token prune ratio", info=HELP["token_prune_ratio"],
                                                elem_id="ft-token-ratio")
                        keep_tokens = gr.Number(16, precision=0, label="Kept visual tokens",
                                                info=HELP["keep_tokens"], interactive=False, elem_id="ft-keep")
                    with gr.Row():
                        grad_ratio = gr.Number(0.2, label="Gradient-update prune ratio",
                                               info=HELP["grad_prune_ratio"], elem_id="ft-grad-ratio")
                        fusion_noise = gr.Checkbox(False, label="Matched fusion noise (heuristic)",
                                                   info=HELP["fusion_noise"], elem_id="ft-fusion")
                    with gr.Row():
                        steps = gr.Number(min(20, s.max_steps), precision=0, label="Steps",
                                          info=HELP["steps"].format(max_steps=s.max_steps, time_limit=s.time_limit),
                                          elem_id="ft-steps")
                        batch_size = gr.Number(32, precision=0, label="Batch size", info=HELP["batch_size"],
                                               elem_id="ft-batch")
                        lr = gr.Textbox("", label="Learning rate", placeholder="method default", info=HELP["lr"],
                                        elem_id="ft-lr")
                    with gr.Row():
                        run_btn = gr.Button("Run", variant="primary", elem_id="ft-run")
                        cancel_btn = gr.Button("Cancel", variant="stop", elem_id="ft-cancel")
                with gr.Column(scale=3):
                    ft_status = gr.HTML(h.message_html("Choose the settings and press Run."), elem_id="ft-status")
                    curve = gr.Plot(label="Loss and ε spent per step", elem_id="ft-curve")
                    result_md = gr.Markdown(elem_id="ft-result")
                    with gr.Accordion("Run settings (JSON)", open=False):
                        settings_json = gr.JSON(label="Settings and result", elem_id="ft-settings")
                    download = gr.File(label="Download the run settings (JSON)", interactive=False, height=90,
                                       elem_id="ft-download")

        # ---------------------------------------------------------------- tokens
        with gr.Tab("Visual tokens", id="tokens"):
            with gr.Row():
                with gr.Column(scale=2):
                    example = gr.Slider(0, n_examples - 1, value=0, step=1, label="Test image",
                                        info=HELP["example"].format(last=n_examples - 1), elem_id="tok-example")
                    upload = gr.File(label="Upload an image (overrides the test image)", file_count="single",
                                     type="filepath", elem_id="tok-upload")
                    gr.Markdown(HELP["upload"])
                    tok_strategy = gr.Dropdown(strategies, value="dual-priv", label="Strategy",
                                               info=HELP["tok_strategy"], elem_id="tok-strategy")
                    tok_mode = gr.Radio(budget_modes, value=h.BUDGET_RATIO, label="Budget given as",
                                        info=HELP["budget_mode"], elem_id="tok-budget-mode")
                    with gr.Row():
                        tok_ratio = gr.Number(0.75, label="Token prune ratio", info=HELP["token_prune_ratio"],
                                              elem_id="tok-ratio")
                        tok_keep = gr.Number(16, precision=0, label="Kept visual tokens",
                                             info=f"Visual tokens fed to the LLM (1 to {n_patches}).",
                                             interactive=False, elem_id="tok-keep")
                    tok_btn = gr.Button("Show tokens", variant="primary", elem_id="tok-run")
                with gr.Column(scale=3):
                    tok_status = gr.HTML(h.message_html("Pick an image and a budget, then press Show tokens."),
                                         elem_id="tok-status")
                    overlay = gr.Plot(label="Pruning decision", elem_id="tok-overlay")
                    counts = gr.JSON(label="Counts", elem_id="tok-counts")
                    histogram = gr.Plot(label="Where the kept patches lie", elem_id="tok-hist")

        # ---------------------------------------------------------------- memory
        with gr.Tab("Memory", id="memory"):
            with gr.Row():
                with gr.Column(scale=2):
                    bench_methods = gr.CheckboxGroup(method_choices, value=list(h.METHODS), label="Methods",
                                                     info=HELP["bench_methods"], elem_id="mem-methods")
                    with gr.Row():
                        bench_batch = gr.Number(8, precision=0, label="Batch size", info=HELP["bench_batch"],
                                                elem_id="mem-batch")
                        bench_steps = gr.Number(3, precision=0, label="Steps", info=HELP["bench_steps"],
                                                elem_id="mem-steps")
                    bench_strategy = gr.Dropdown(strategies, value="dual-priv", label="Dual-Priv token strategy",
                                                 info="Token strategy of the Dual-Priv row (the baselines keep "
                                                      "every token).", elem_id="mem-strategy")
                    bench_mode = gr.Radio(budget_modes, value=h.BUDGET_RATIO, label="Token budget given as",
                                          info=HELP["budget_mode"], elem_id="mem-budget-mode")
                    with gr.Row():
                        bench_ratio = gr.Number(0.75, label="Token prune ratio", info=HELP["token_prune_ratio"],
                                                elem_id="mem-ratio")
                        bench_keep = gr.Number(16, precision=0, label="Kept visual tokens",
                                               info=HELP["keep_tokens"], interactive=False, elem_id="mem-keep")
                    bench_grad = gr.Number(0.2, label="Gradient-update prune ratio", info=HELP["grad_prune_ratio"],
                                           elem_id="mem-grad-ratio")
                    bench_btn = gr.Button("Measure", variant="primary", elem_id="mem-run")
                with gr.Column(scale=3):
                    mem_status = gr.HTML(h.message_html("Press Measure: each method runs a few steps on the same "
                                                        "batch."), elem_id="mem-status")
                    mem_figure = gr.Plot(label="Peak memory", elem_id="mem-figure")
                    mem_table = gr.Dataframe(label="Measurements (ratios to DP-SGD and DP-ZO)", interactive=False,
                                             elem_id="mem-table")
                    mem_note = gr.Markdown(elem_id="mem-note")

        # ---------------------------------------------------------------- privacy-utility
        with gr.Tab("Privacy–utility", id="sweep"):
            with gr.Row():
                with gr.Column(scale=2):
                    sw_methods = gr.CheckboxGroup(method_choices, value=["dp-sgd", "dual-priv"], label="Methods",
                                                  info=HELP["sweep_methods"], elem_id="sw-methods")
                    sw_eps = gr.Textbox("1, 3, 8", label="ε values", info=HELP["sweep_eps"], elem_id="sw-eps")
                    with gr.Row():
                        sw_seeds = gr.Number(1, precision=0, label="Seeds", info=HELP["sweep_seeds"],
                                             elem_id="sw-seeds")
                        sw_steps = gr.Number(min(20, s.max_steps), precision=0, label="Steps per run",
                                             info=HELP["sweep_steps"], elem_id="sw-steps")
                        sw_batch = gr.Number(32, precision=0, label="Batch size", info=HELP["batch_size"],
                                             elem_id="sw-batch")
                    with gr.Row():
                        sw_btn = gr.Button("Run sweep", variant="primary", elem_id="sw-run")
                        sw_cancel = gr.Button("Cancel", variant="stop", elem_id="sw-cancel")
                    sw_csv = gr.File(label="Or load a sweep CSV", file_count="single", type="filepath",
                                     elem_id="sw-csv")
                    gr.Markdown(HELP["sweep_csv"])
                with gr.Column(scale=3):
                    sw_status = gr.HTML(h.message_html("Run a small sweep or load a sweep CSV."), elem_id="sw-status")
                    sw_figure = gr.Plot(label="Accuracy vs ε", elem_id="sw-figure")
                    sw_table = gr.Dataframe(label="Runs", interactive=False, elem_id="sw-table")
                    sw_download = gr.File(label="Download the sweep (CSV)", interactive=False, height=90,
                                          elem_id="sw-download")

        # ---------------------------------------------------------------- wiring
        def budget_toggle(mode):
            return gr.update(interactive=mode == h.BUDGET_RATIO), gr.update(interactive=mode == h.BUDGET_KEEP)

        for mode_c, ratio_c, keep_c in ((budget_mode, token_ratio, keep_tokens), (tok_mode, tok_ratio, tok_keep),
                                        (bench_mode, bench_ratio, bench_keep)):
            mode_c.change(budget_toggle, mode_c, [ratio_c, keep_c], queue=False, show_progress="hidden",
                          api_name=False)
        ft_outputs = dict(status=ft_status, curve=curve, result=result_md, settings=settings_json, download=download)

        def run_finetune(method_v, eps_v, delta_v, mode_v, ratio_v, keep_v, strategy_v, grad_v, steps_v, batch_v,
                         lr_v, fusion_v, request: gr.Request):
            for update in h.finetune(s, method_v, eps_v, delta_v, mode_v, ratio_v, keep_v, strategy_v, grad_v,
                                     steps_v, batch_v, lr_v, fusion_v, session=_session(request)):
                yield {ft_outputs[k]: v for k, v in update.items()}

        run_btn.click(run_finetune, [method, epsilon, delta, budget_mode, token_ratio, keep_tokens, token_strategy,
                                     grad_ratio, steps, batch_size, lr, fusion_noise],
                      list(ft_outputs.values()), concurrency_id=HEAVY, concurrency_limit=1,
                      show_progress="minimal", api_name="finetune")

        def cancel_run(request: gr.Request):
            return h.cancel(_session(request))

        cancel_btn.click(cancel_run, None, ft_status, concurrency_limit=None, show_progress="hidden",
                         api_name="cancel")

        tok_outputs = dict(status=tok_status, overlay=overlay, histogram=histogram, counts=counts)

        def show_tokens(example_v, upload_v, strategy_v, mode_v, ratio_v, keep_v,
                        progress=gr.Progress(track_tqdm=True)):
            update = h.tokens_view(s, example_v, upload_v, strategy_v, mode_v, ratio_v, keep_v)
            return {tok_outputs[k]: v for k, v in update.items()}

        tok_inputs = [example, upload, tok_strategy, tok_mode, tok_ratio, tok_keep]
        tok_btn.click(show_tokens, tok_inputs, list(tok_outputs.values()), concurrency_limit=1, api_name="tokens")
        example.release(show_tokens, tok_inputs, list(tok_outputs.values()), concurrency_limit=1,
                        show_progress="minimal", api_name=False)
        upload.upload(show_tokens, tok_inputs, list(tok_outputs.values()), concurrency_limit=1, api_name=False)

        mem_outputs = dict(status=mem_status, figure=mem_figure, table=mem_table, note=mem_note)

        def run_memory(methods_v, batch_v, steps_v, strategy_v, mode_v, ratio_v, keep_v, grad_v):
            for update in h.memory(s, methods_v, batch_v, steps_v, strategy_v, mode_v, ratio_v, keep_v, grad_v):
                yield {mem_outputs[k]: v for k, v in update.items()}

        bench_btn.click(run_memory, [bench_methods, bench_batch, bench_steps, bench_strategy, bench_mode, bench_ratio,
                                     bench_keep, bench_grad], list(mem_outputs.values()), concurrency_id=HEAVY,
                        concurrency_limit=1, show_progress="minimal", api_name="memory")

        sw_outputs = dict(status=sw_status, figure=sw_figure, table=sw_table, download=sw_download)

        def run_sweep(methods_v, eps_v, seeds_v, steps_v, batch_v, request: gr.Request):
            for update in h.sweep(s, methods_v, eps_v, seeds_v, steps_v, batch_v, session=_session(request)):
                yield {sw_outputs[k]: v for k, v in update.items()}

        sw_btn.click(run_sweep, [sw_methods, sw_eps, sw_seeds, sw_steps, sw_batch], list(sw_outputs.values()),
                     concurrency_id=HEAVY, concurrency_limit=1, show_progress="minimal", api_name="sweep")

        def load_csv(path_v):
            update = h.load_sweep_csv(path_v)
            return {sw_outputs[k]: v for k, v in update.items()}

        sw_cancel.click(cancel_run, None, sw_status, concurrency_limit=None, show_progress="hidden",
                        api_name=False)
        sw_csv.upload(load_csv, sw_csv, [sw_status, sw_figure, sw_table], concurrency_limit=1, api_name="load_sweep")

        demo.load(header, None, heading, queue=False, show_progress="hidden", api_name=False)  # warm start state

    demo.queue(default_concurrency_limit=1)
    demo.dashboard_settings = s
    return demo


def launch(demo, host: str = "127.0.0.1", port: int = 7860, share: bool = False, **kwargs):
    """Serve ``demo``: local by default, uploads capped at 20 MB and kept in the temporary directory."""
    os.makedirs(h.temp_root(), exist_ok=True)
    options = dict(server_name=host, server_port=port, share=share, show_error=True, max_file_size="20mb",
                   ssr_mode=False, footer_links=["gradio", "settings"], css=CSS)
    options.update(kwargs)
    return demo.launch(**options)
