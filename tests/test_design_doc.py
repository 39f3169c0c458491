"""docs/DESIGN.md stays true: its map names modules that exist, and its how-to code blocks run."""
from __future__ import annotations

import importlib
import re
from pathlib import Path

import pytest

from toolkit.methods import unregister_method
from toolkit.optimizers import OPTIMIZER_BUILDERS
from toolkit.tokens.registry import STRATEGIES

DESIGN = (Path(__file__).resolve().parents[1] / "docs" / "DESIGN.md").read_text()


def _section(title: str) -> str:
    start = DESIGN.index(title)
    nxt = DESIGN.find("\n## ", start + len(title))
    return DESIGN[start: nxt if nxt >= 0 else None]


def test_every_module_on_the_map_exists():
    names = set(re.findall(r"toolkit\.[a-z_]+(?:\.[a-z_]+)?", _section("## One-page map")))
    assert len(names) >= 10
    for name in sorted(names):
        importlib.import_module(name)


HOWTO_BLOCKS = re.findall(r"```python\n(.*?)```", _section("## How to add"), flags=re.S)


@pytest.mark.parametrize("block", HOWTO_BLOCKS, ids=[f"block{i}" for i in range(len(HOWTO_BLOCKS))])
def test_each_how_to_block_runs(block):
    before_strategies, before_builders = set(STRATEGIES), set(OPTIMIZER_BUILDERS)
    from toolkit.methods import method_names
    before_methods = set(method_names())
    try:
        exec(compile(block, "docs/DESIGN.md", "exec"), {})
    finally:  # leave the registries as they were for the other tests
        for name in set(STRATEGIES) - before_strategies:
            del STRATEGIES[name]
        for name in set(OPTIMIZER_BUILDERS) - before_builders:
            del OPTIMIZER_BUILDERS[name]
        for name in set(method_names()) - before_methods:
            unregister_method(name)


def test_the_how_to_has_a_block_per_extension_point():
    assert len(HOWTO_BLOCKS) >= 2
