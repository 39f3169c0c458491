"""The Gradio dashboard (``python app.py``): a thin layer over the public toolkit API.

:func:`build_app` makes the ``gr.Blocks``; the handlers in :mod:`toolkit.dashboard.handlers` are plain
functions (validation, streaming, cancellation) that the UI wires to its components and the tests call directly.
"""
from toolkit.dashboard.handlers import AppSettings, InputError

__all__ = ["build_app", "AppSettings", "InputError"]


def build_app(*args, **kwargs):
    """See :func:`toolkit.dashboard.ui.build_app` (imported lazily: gradio is only needed for the UI)."""
    from toolkit.dashboard.ui import build_app as _build

    return _build(*args, **kwargs)
