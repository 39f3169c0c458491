"""The Gradio dashboard (``python app.py``): a thin layer over the public toolkit API, organised by tab.

* :mod:`.ui`: :func:`build_app` (the page: a header and one call per tab) and :func:`~toolkit.dashboard.ui.launch`.
* :mod:`.tabs`: one module per tab (fine-tune, visual tokens, memory, privacy–utility), each with its handlers
  (plain functions: validation, streaming; the tests call them directly) and the function building its block.
* :mod:`.jobs`: the one runner of long actions: a job per session in a worker thread, events through a queue,
  the single polling loop that yields UI updates, cancel, one heavy job at a time.
* :mod:`.common` (:class:`AppSettings`, :class:`InputError`, status lines, UI value parsing), :mod:`.budget` (the
  visual-token budget controls), :mod:`.model` (the app's model and its public warm start).
"""
from toolkit.dashboard.common import AppSettings, InputError
from toolkit.dashboard.ui import build_app

__all__ = ["build_app", "AppSettings", "InputError"]
