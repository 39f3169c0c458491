"""The Dual-Priv Pruning dashboard: ``python app.py`` (or ``make app``) and open http://127.0.0.1:7860.

Fine-tune with any method (live ε; the result read against chance and a measured non-private reference), compare
the session's runs, fine-tune on your own LLaVA data and download the model, look at the visual tokens a strategy
keeps, measure memory side by side, draw privacy–utility curves and audit the privacy accounting, all on the
embedded default model (preset "tiny" with its public warm start, trained at launch when missing, then cached).
Heavy jobs wait in one line, one at a time (``docs/DASHBOARD.md``). The app is a thin layer over the toolkit: see
``toolkit/dashboard/`` (one module per tab, the job runner, the page) and ``toolkit.train`` / ``toolkit.tokens`` /
``toolkit.bench``.

Flags: ``--host`` (default 127.0.0.1), ``--port`` (7860), ``--share`` (off), ``--auth-file`` (``user:password``
lines; required beyond loopback and with ``--share``; or ``DUALPRIV_APP_AUTH``), ``--max-steps`` (200),
``--time-limit`` seconds (600), ``--preset``, ``--warm-start-steps`` (0 skips the warm start, for tests),
``--train-limit`` / ``--eval-limit`` (fewer records: faster), ``--data-root`` (a folder of data sets users may
pick by relative path), ``--no-bench-isolate``.
Environment: ``DUALPRIV_APP_WARM_START_STEPS``, ``DUALPRIV_APP_TRAIN_LIMIT``, ``DUALPRIV_APP_EVAL_LIMIT``,
``DUALPRIV_APP_DATA_ROOT``, ``DUALPRIV_APP_BENCH_ISOLATE``; uploads and downloads stay under ``GRADIO_TEMP_DIR``
(default ``<system tmp>/dualpriv-app``).
"""
from __future__ import annotations

import argparse
import os
import tempfile

# Before gradio is imported: uploads and generated files live in a temporary directory, no telemetry.
os.environ.setdefault("GRADIO_TEMP_DIR", os.path.join(tempfile.gettempdir(), "dualpriv-app"))
os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
# A readable server log. The memory measurement profiles a step from a worker thread; the profiler (kineto) then
# printed "USDT ... profiler_start/stop" twice per run and a benign "ERROR: External init callback must run in
# same thread as registerClient", and c10 a "[W] Memory block of unknown size" warning: level 6 silences kineto's
# own log, ERROR keeps c10's real errors. Loading weights printed carriage-return progress bars into one long line.
os.environ.setdefault("KINETO_LOG_LEVEL", "6")
os.environ.setdefault("TORCH_CPP_LOG_LEVEL", "ERROR")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")

# Imported after the lines above on purpose: gradio and transformers read those variables when imported.
from toolkit.dashboard import build_app as _build_app  # noqa: E402
from toolkit.dashboard.access import AccessError, auth_from, require_auth  # noqa: E402
from toolkit.dashboard.ui import launch  # noqa: E402
from toolkit.models import PRESETS  # noqa: E402
from transformers.utils import logging as transformers_logging  # noqa: E402


def build_app(max_steps: int = 200, time_limit: float = 600.0, preset: str = "tiny", **options):
    """The dashboard ``gr.Blocks`` (see :func:`toolkit.dashboard.ui.build_app`)."""
    return _build_app(max_steps=max_steps, time_limit=time_limit, preset=preset, **options)


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1", help="interface to bind (default 127.0.0.1: this machine only)")
    parser.add_argument("--port", type=int, default=7860, help="port (default 7860)")
    parser.add_argument("--share", action="store_true",
                        help="create a public Gradio share link (off by default; needs authentication)")
    parser.add_argument("--auth-file", default=None,
                        help="a file of 'user:password' lines that only you can read (chmod 600): the accounts "
                             "that may log in; or set DUALPRIV_APP_AUTH. Required with --share or a host other "
                             "than 127.0.0.1 / localhost")
    parser.add_argument("--max-steps", type=int, default=200, help="most optimizer steps a job may run (default 200)")
    parser.add_argument("--time-limit", type=float, default=600.0,
                        help="seconds after which a fine-tune is stopped cleanly (default 600)")
    parser.add_argument("--preset", default="tiny", choices=sorted(PRESETS), help="embedded model (default tiny)")
    parser.add_argument("--warm-start-steps", type=int, default=None,
                        help="public warm-start steps (default: the preset's; 0: none, an untrained model)")
    parser.add_argument("--train-limit", type=int, default=None, help="private records used (default: all)")
    parser.add_argument("--eval-limit", type=int, default=None, help="test records evaluated (default: all)")
    parser.add_argument("--data-root", default=None,
                        help="a folder of data sets users may pick by a path relative to it (never outside it); "
                             "without it, users upload a zip")
    parser.add_argument("--no-bench-isolate", action="store_true",
                        help="measure memory in the app's process instead of a fresh subprocess per method")
    args = parser.parse_args(argv)
    if args.max_steps < 1:
        parser.error(f"--max-steps must be >= 1, got {args.max_steps}")
    if not args.time_limit > 0:
        parser.error(f"--time-limit must be > 0, got {args.time_limit}")
    if args.warm_start_steps is not None and args.warm_start_steps < 0:
        parser.error(f"--warm-start-steps must be >= 0, got {args.warm_start_steps}")
    if args.data_root is not None and not os.path.isdir(args.data_root):
        parser.error(f"--data-root must be an existing folder, got {args.data_root!r}")
    try:
        args.auth = auth_from(args.auth_file)
        require_auth(args.host, args.share, args.auth)
    except AccessError as err:
        parser.error(str(err))
    return args


def main(argv=None) -> None:
    args = parse_args(argv)
    transformers_logging.disable_progress_bar()  # "Loading weights" bars: one long line in a server log
    options = dict(warm_start_steps=args.warm_start_steps, train_limit=args.train_limit, eval_limit=args.eval_limit,
                   data_root=args.data_root)
    if args.no_bench_isolate:
        options["bench_isolate"] = False
    demo = build_app(max_steps=args.max_steps, time_limit=args.time_limit, preset=args.preset, **options)
    launch(demo, host=args.host, port=args.port, share=args.share, auth=args.auth)


if __name__ == "__main__":
    main()
