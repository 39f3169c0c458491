"""Settings for every collected test and doctest (tests/ and the toolkit's docstrings): offline, one thread."""
from __future__ import annotations

import os

import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
# One thread: these models are tiny, and OpenMP threads spinning against other processes on a
# 2-core machine made steps up to 35x slower. Override with TOOLKIT_TEST_THREADS.
torch.set_num_threads(int(os.environ.get("TOOLKIT_TEST_THREADS", "1")))
