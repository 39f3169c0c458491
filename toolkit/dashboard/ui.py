"""The dashboard's page: a header and one tab per task (each built by its module in :mod:`toolkit.dashboard.tabs`),
and :func:`launch` to serve it."""
from __future__ import annotations

import os

import gradio as gr
import torch

from starlette.middleware import Middleware

from toolkit.dashboard import access, model
from toolkit.dashboard.common import APP_PRIVACY_UNIT, AppSettings, temp_root
from toolkit.dashboard.tabs import audit, finetune, memory, runs, sweep, tokens, yourdata

CSS = """
.dp-msg {padding: 6px 10px; border-radius: 6px; margin: 2px 0;}
.dp-error {background: #fde8e8; color: #9b1c1c; border: 1px solid #f8b4b4; font-weight: 600;}
.dp-warn {background: #fdf6b2; color: #723b13;}
.dp-ok {background: #def7ec; color: #03543f;}
.dp-info {background: #e1effe; color: #1e429f;}
.dp-progress progress {width: 60%; height: 14px; vertical-align: middle;}
.dp-progress span {margin-left: 8px;}
.dp-queued {border: 1px solid #a4cafe;}
/* table headers wrap between words, never inside one ("memor-y") */
#mem-table th *, #runs-table th *, #sw-table th *, #yd-refused th * {word-break: keep-all; overflow-wrap: normal;}
"""
HEADER_REFRESH_S = 2.0


def header_markdown(settings: AppSettings) -> str:
    """The page header: task, model (and whether its warm start is cached yet), privacy unit and job limits."""
    s = settings
    return ("# Dual-Priv Pruning: differentially private fine-tuning of a LLaVA-style model\n"
            f"Embedded task: **{s.task}** on handwritten digits; {model.warm_start_note(s)}. "
            f"Privacy unit: **{APP_PRIVACY_UNIT}**, so ε bounds what a run reveals about any single image. "
            f"Jobs are limited to {s.max_steps} steps and {s.time_limit:g} s, and queue one at a time.")


def build_app(max_steps: int = 200, time_limit: float = 600.0, preset: str = "tiny",
              warm_start_steps: int | None = None, settings: AppSettings | None = None, **options) -> gr.Blocks:
    """The dashboard as a ``gr.Blocks`` (queue enabled, one heavy job at a time).

    ``warm_start_steps=0`` (or ``DUALPRIV_APP_WARM_START_STEPS=0``) skips the public warm start (tests);
    other ``options`` are :class:`AppSettings` fields (``train_limit``, ``eval_limit``, ``bench_isolate``, ...).
    """
    if settings is None:
        settings = AppSettings.from_env(max_steps=max_steps, time_limit=time_limit, preset=preset,
                                        warm_start_steps=warm_start_steps, **options)
    s = settings

    def header() -> str:
        return header_markdown(s)

    # delete_cache: files the app created (uploads, downloads) older than a day are removed every hour
    def tick():  # while the warm start is missing, the header follows its training; then the timer stops
        return header(), gr.Timer(active=not model.warm_start_cached(s))

    with gr.Blocks(title="Dual-Priv Pruning dashboard", analytics_enabled=False,
                   delete_cache=(3600, 86400)) as demo:
        heading = gr.Markdown(header(), elem_id="header")
        runs_state = gr.State([])  # the session's runs (one dict each): written by jobs, read by the Runs tab
        may_train_warm_start = (finetune.build(s, runs_state) + runs.build(s, runs_state)
                                + yourdata.build(s, runs_state) + tokens.build(s) + memory.build(s)
                                + sweep.build(s, runs_state) + audit.build(s, runs_state))
        for event in may_train_warm_start:  # the header then says the warm start is cached
            event.then(header, None, heading, queue=False, show_progress="hidden", api_name=False)
        timer = gr.Timer(HEADER_REFRESH_S, active=not model.warm_start_cached(s))
        timer.tick(tick, None, [heading, timer], queue=False, show_progress="hidden", api_name=False)
        demo.load(header, None, heading, queue=False, show_progress="hidden", api_name=False)
    demo.queue(default_concurrency_limit=1)
    demo.dashboard_settings = s
    return demo


def launch(demo: gr.Blocks, host: str = "127.0.0.1", port: int = 7860, share: bool = False, auth=None,
           **kwargs):
    """Serve ``demo``: local by default, uploads capped at 20 MB and kept in the temporary directory (mode 0700),
    each browser's files fetchable by that browser only (:class:`~toolkit.dashboard.access.FileOwners`). Serving
    beyond loopback or with ``share`` needs ``auth`` (Gradio's accounts; :func:`access.require_auth` refuses
    otherwise). A missing public warm start starts training at once, as the server's own job in the line (the
    header follows it), so the first user's job waits for less of it."""
    access.require_auth(host, share, auth)
    os.makedirs(temp_root(), exist_ok=True)
    os.chmod(temp_root(), 0o700)  # Gradio's uploads and downloads: private to the server's user
    # The profiler (memory measurement) first runs in a worker thread; kineto's one-time init then logged
    # "ERROR: External init callback must run in same thread as registerClient". Initialised here, in the
    # main thread, it stays quiet.
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]):
        pass
    model.prepare_in_background(demo.dashboard_settings)
    options = dict(server_name=host, server_port=port, share=share, auth=auth, show_error=True,
                   max_file_size="20mb", ssr_mode=False, footer_links=["gradio", "settings"], css=CSS,
                   app_kwargs=dict(middleware=[Middleware(access.FileOwners, root=temp_root())]))
    options.update(kwargs)
    return demo.launch(**options)
