"""transformers' own output, silenced where the toolkit speaks for it: its loading warnings while the toolkit
checks the loading report itself, and its progress bars (loading and writing weights) in a run asked for none.

Example::

    >>> from toolkit.quiet import quiet_transformers, transformers_progress_bars
    >>> with quiet_transformers(), transformers_progress_bars(False):
    ...     pass
"""
from __future__ import annotations

import contextlib

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


@contextlib.contextmanager
def transformers_progress_bars(shown: bool):
    """transformers' (and the Hub's) progress bars hidden while inside unless ``shown``, then as they were: a run
    with ``progress=False`` must not print "Loading weights" or "Writing model shards" bars into a user's log.
    ``shown`` leaves them as the user set them (e.g. ``HF_HUB_DISABLE_PROGRESS_BARS``)."""
    before = hf_logging.is_progress_bar_enabled()
    if not shown:
        hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if before and not shown:
            hf_logging.enable_progress_bar()
