"""Data-parallel training: ``torchrun --nproc-per-node 2 -m toolkit train`` (gloo, 2 CPU processes) gives the same
parameters and the same ε as one process with the same noise seed: the global Poisson batch is shared out, the
noise is added once, mechanism 2's mask is computed from the combined noisy gradient, and ε is reported once."""
from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from toolkit.checkpoint import load_checkpoint
from toolkit.train import TrainConfig, train

ROOT = Path(__file__).resolve().parents[1]
SETTINGS = dict(method="dual-priv", steps=3, train_limit=32, eval_limit=16, warm_start_steps=0,
                expected_batch_size=8, noise_seed=0, max_physical_batch_size=3, progress=False)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _flags(settings: dict) -> list[str]:
    return [x for k, v in settings.items() if v is not None
            for x in (f"--{k.replace('_', '-')}", str(v).lower() if isinstance(v, bool) else str(v))]


def _torchrun(tmp_path: Path, settings: dict, nproc: int = 2) -> tuple[dict, object, str]:
    torchrun = shutil.which("torchrun", path=os.path.dirname(sys.executable)) or shutil.which("torchrun")
    assert torchrun, "torchrun (torch's launcher) not found next to the Python interpreter"
    ckpt, out = tmp_path / "ddp.pt", tmp_path / "ddp.json"
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT), MASTER_ADDR="127.0.0.1")
    cmd = [torchrun, "--nproc-per-node", str(nproc), "--master-addr", "127.0.0.1", "--master-port",
           str(_free_port()), "-m", "toolkit", "train", *_flags(settings), "--checkpoint-path", str(ckpt),
           "--json", str(out)]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(out.read_text()), load_checkpoint(ckpt), proc.stdout


CASES = {
    "dual-priv, physical chunks": SETTINGS,
    # q = 1/32: most global batches hold 0 or 1 record, so rank 1's share is often empty (it joins with a zero sum)
    "dual-priv, empty shares": dict(SETTINGS, expected_batch_size=1, steps=6),
    "non-private": dict(SETTINGS, method="non-private", expected_batch_size=3, noise_seed=None),
}


@pytest.mark.parametrize("case", list(CASES))
def test_two_processes_equal_one_process_in_parameters_and_epsilon(tmp_path, case):
    settings = CASES[case]
    summary, ddp, stdout = _torchrun(tmp_path, settings)
    single = train(TrainConfig(checkpoint_path=str(tmp_path / "one.pt"), **settings))
    one = load_checkpoint(tmp_path / "one.pt")

    assert summary["world_size"] == 2 and single.extra["world_size"] == 1
    assert stdout.count('"epsilon_spent"') == 1  # reported once (rank 0)
    assert set(ddp.trainable) == set(one.trainable)
    for name, value in one.trainable.items():
        torch.testing.assert_close(ddp.trainable[name], value, atol=1e-5, rtol=0, msg=name)
    assert summary["accuracy"] == pytest.approx(single.accuracy)
    if settings["method"] == "non-private":
        assert summary["epsilon_spent"] in ("inf", "Infinity", float("inf"))
        return
    q = settings["expected_batch_size"] / 32
    assert summary["epsilon_spent"] == pytest.approx(single.epsilon_spent, rel=1e-12)
    assert 0 < summary["epsilon_spent"] <= 3
    assert summary["sample_rate"] == single.sample_rate == pytest.approx(q)  # the global q, not q / 2
    # one accountant step per logical batch at the global rate, as in one process
    history = [tuple(h) for h in ddp.optimizer["accountant"]["history"]]
    assert history == [tuple(h) for h in one.optimizer["accountant"]["history"]] == \
        [(single.noise_multiplier, q, settings["steps"])]
    # the runs really trained (the noise alone moves every LoRA B weight by far more than 1e-5)
    assert min(float(v.abs().max()) for n, v in one.trainable.items() if "lora_B" in n) > 1e-3


def test_dp_zo_refuses_to_run_data_parallel(monkeypatch):
    import toolkit.optimizers as optimizers
    from toolkit.distributed import DistributedContext
    from toolkit.models import build_model

    monkeypatch.setattr(optimizers, "context", lambda: DistributedContext(rank=0, world_size=2, local_rank=0))
    module = build_model("tiny").model.model.multi_modal_projector
    config = TrainConfig(method="dp-zo", steps=1).resolved()
    with pytest.raises(ValueError, match="dp-zo does not run data-parallel"):
        optimizers.make_optimizer(config, module, noise_multiplier=1.0, sample_rate=0.1)
