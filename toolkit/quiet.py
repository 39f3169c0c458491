"""transformers' own output, silenced where the toolkit speaks for it: its loading warnings while the toolkit
checks the loading report itself, and its progress bars (loading and writing weights) in a run asked for none.

Example::

    >>> from toolkit.quiet import quiet_transformers, transformers_progress_bars
    >>> with quiet_transformers(), transformers_progress_bars(False):
    ...     pass
"""
from __future__ import annotations

import contextlib
import threading

import huggingface_hub.utils as hub_utils
from transformers.utils import logging as hf_logging


@contextlib.contextmanager
def quiet_transformers():
    """Silence transformers' warnings (its missing/unexpected-weights table among them) while loading: the
    toolkit checks the loading report itself and raises instead."""
    level = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        yield
    finally:
        hf_logging.set_verbosity(level)


_BARS_LOCK = threading.Lock()
_bars_hidden = dict(depth=0, transformers=True, hub_disabled=False)   # nesting depth; the state to restore


@contextlib.contextmanager
def transformers_progress_bars(shown: bool):
    """transformers' (and the Hub's) progress bars hidden while inside unless ``shown``, then as they were: a run
    with ``progress=False`` must not print "Loading weights" or "Writing model shards" bars into a user's log.
    ``shown`` leaves them as the user set them (e.g. ``HF_HUB_DISABLE_PROGRESS_BARS``).

    The switch is process-wide (transformers has no other), so overlapping runs in threads (the dashboard) count:
    the first to hide saves the state, the last to leave restores it; a run with bars inside another's hidden
    window goes without them."""
    if shown:
        yield
        return
    with _BARS_LOCK:
        if _bars_hidden["depth"] == 0:
            _bars_hidden.update(transformers=hf_logging.is_progress_bar_enabled(),
                                hub_disabled=hub_utils.are_progress_bars_disabled())
            hf_logging.disable_progress_bar()
        _bars_hidden["depth"] += 1
    try:
        yield
    finally:
        with _BARS_LOCK:
            _bars_hidden["depth"] -= 1
            if _bars_hidden["depth"] == 0:
                if _bars_hidden["transformers"]:
                    hf_logging.enable_progress_bar()      # turns the Hub's on too: put its own state back
                if _bars_hidden["hub_disabled"]:
                    hub_utils.disable_progress_bars()
                else:
                    hub_utils.enable_progress_bars()
