"""One place per idea: the Method registry is what every part asks, and TrainConfig's schema validates, documents and
builds the command line."""
from __future__ import annotations

import dataclasses
import math
import subprocess
import sys

import pytest
import torch

from toolkit.config import TrainConfig
from toolkit.methods import Method, get_method, method_names, register_method, unregister_method
from toolkit.optimizers import OPTIMIZER_BUILDERS, NonPrivateOptimizer, register_optimizer
from toolkit.schema import choices_of


class SignSGD(torch.optim.Optimizer):
    """A toy optimizer for the toy method: steps by the sign of the gradient."""

    def __init__(self, params, lr):
        super().__init__(params, dict(lr=lr))

    @torch.no_grad()
    def step(self):
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is not None:
                    p.add_(p.grad.sign(), alpha=-group["lr"])


def _sign_sgd(c, module, params, noise_multiplier, sample_rate, public_gradients=None):
    return NonPrivateOptimizer(module, SignSGD(params, lr=c.lr))


@pytest.fixture
def toy_method():
    """A fifth method registered the documented way (its record + its optimizer builder), removed afterwards."""
    register_method(Method("toy-sign-sgd", "Sign-SGD (toy)", "#000000", private=False, noise="none",
                           default_lr=1e-4))
    register_optimizer("toy-sign-sgd", _sign_sgd)
    yield "toy-sign-sgd"
    unregister_method("toy-sign-sgd")
    OPTIMIZER_BUILDERS.pop("toy-sign-sgd", None)


def test_a_registered_method_trains_end_to_end_with_its_own_defaults(toy_method):
    from toolkit.train import train

    config = TrainConfig(method=toy_method, steps=2, expected_batch_size=8, train_limit=16, eval_limit=8,
                         warm_start_steps=0, progress=False)
    resolved = config.resolved()
    assert resolved.lr == 1e-4 and resolved.sampling == "fixed" and resolved.grad_prune_ratio == 0.0
    assert resolved.token_strategy == "none" and not resolved.private
    result = train(config)
    assert result.steps == 2 and math.isinf(result.epsilon_spent) and 0.0 <= result.accuracy <= 1.0


def test_the_method_rules_come_from_the_record():
    for name in method_names():
        method = get_method(name)
        c = TrainConfig(method=name, steps=1).resolved()
        assert c.private == method.private
        assert c.lr == method.default_lr
        assert c.grad_prune_ratio == method.default_grad_prune_ratio
        assert c.token_strategy == method.default_token_strategy
        assert c.sampling == ("poisson" if method.private else "fixed")
    with pytest.raises(ValueError, match="no gradient vector to prune"):
        TrainConfig(method="dp-zo", steps=1, grad_prune_ratio=0.3).resolved()


def test_an_inconsistent_method_record_is_refused():
    with pytest.raises(ValueError, match="private method adds noise"):
        Method("bad", "Bad", "#000", private=True, noise="none", default_lr=1e-3)
    with pytest.raises(ValueError, match="needs a noisy gradient"):
        Method("bad", "Bad", "#000", private=True, noise="scalar", default_lr=1e-3, prunes_update=True)
    with pytest.raises(ValueError, match="already registered"):
        register_method(get_method("dp-sgd"))


def test_every_config_field_carries_a_schema():
    for field in dataclasses.fields(TrainConfig):
        assert field.metadata.get("group") and field.metadata.get("help"), field.name


@pytest.mark.parametrize("bad", [dict(grad_sample_mode="bogus"), dict(accountant="moments"), dict(dtype="fp8"),
                                 dict(prune_scope="layer"), dict(trainable="everything"), dict(task="colour"),
                                 dict(lora_rank=0), dict(expected_batch_size=2.5), dict(token_strategy="best"),
                                 dict(feature_cache="false"), dict(secure_mode=1),    # a switch is True or False
                                 dict(allow_large_delta="false"),     # was truthy: δ ≥ 1/N would have been accepted
                                 dict(keep_tokens=8, token_prune_ratio=0.5),           # one visual-token budget
                                 dict(epochs=2.0)])                                    # with steps=1: one length
def test_a_bad_choice_or_bound_is_refused_before_any_model_is_built(bad, monkeypatch):
    import toolkit.run_setup as run_setup
    import toolkit.train as train_module

    def no_model(*args, **kwargs):
        raise AssertionError("a model was built before the config was validated")

    monkeypatch.setattr(run_setup, "model_stage", no_model)
    name = next(iter(bad))
    with pytest.raises(ValueError, match=name):
        train_module.train(TrainConfig(steps=1, **bad))


def test_from_dict_refuses_unknown_keys_by_name_and_can_drop_them():
    with pytest.raises(ValueError, match="'epsilonn'"):
        TrainConfig.from_dict({"epsilonn": 3.0})
    with pytest.warns(UserWarning, match="epsilonn"):
        c = TrainConfig.from_dict({"epsilon": 2.0, "epsilonn": 3.0}, unknown="warn")
    assert c.epsilon == 2.0
    assert TrainConfig.from_dict({"future_field": 1}, unknown="ignore") == TrainConfig()


def test_epsilon_is_read_by_the_one_parser_everywhere():
    assert TrainConfig(epsilon="inf", steps=1).resolved().epsilon == math.inf
    assert TrainConfig(epsilon="∞", steps=1).resolved().epsilon == math.inf
    with pytest.raises(ValueError, match="epsilon must be a number > 0"):
        TrainConfig(epsilon="three", steps=1).resolved()


def test_train_help_lists_every_choice_from_the_schema():
    out = subprocess.run([sys.executable, "-m", "toolkit", "train", "--help"], capture_output=True, text=True,
                         timeout=120, check=True).stdout
    for field in dataclasses.fields(TrainConfig):
        choices = choices_of(field)
        if choices:
            assert "{" + ",".join(choices) + "}" in out.replace("\n", "").replace(" ", ""), field.name
    assert "--update-mask {noisy,past-noisy,public,random}" in out
