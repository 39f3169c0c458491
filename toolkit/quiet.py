"""transformers' own loading warnings, silenced while the toolkit checks the loading report itself.

Example::

    >>> from toolkit.quiet import quiet_transformers
    >>> with quiet_transformers():
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
