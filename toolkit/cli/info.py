"""``python -m toolkit info``: versions, presets, device, embedded data sets and their sizes."""
from __future__ import annotations

import json
import platform

from toolkit.cli import subcommand


@subcommand("info", help="versions, model presets, device and embedded data sets")
def run(args) -> dict:
    import opacus
    import peft
    import torch
    import transformers

    import toolkit
    from toolkit.data import SCENE_SPLITS, SPLITS, TASKS, dataset_sizes
    from toolkit.models import PRESETS

    result = dict(
        toolkit=toolkit.__version__, python=platform.python_version(), torch=torch.__version__,
        transformers=transformers.__version__, opacus=opacus.__version__, peft=peft.__version__,
        device="cuda" if torch.cuda.is_available() else "cpu",
        cuda_device=torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        presets={name: spec["description"] for name, spec in PRESETS.items()},
        tasks={name: spec[0] for name, spec in TASKS.items()},
        splits={name: list(bounds) for name, bounds in SPLITS.items()},
        scene_splits={name: list(bounds) for name, bounds in SCENE_SPLITS.items()},
        dataset_sizes=dataset_sizes(),
    )
    print(json.dumps(result, indent=2))
    return result


@run.configure
def configure(parser) -> None:
    pass
