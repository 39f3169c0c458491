"""User-level DP (toolkit.privacy.user_level): one user's total contribution is ≤ C whatever their records, the
accountant sees users, and a record-level sampler in user mode is caught."""
from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from toolkit.privacy import PoissonSampler, make_private
from toolkit.privacy.accounting import epsilon_for
from toolkit.privacy.user_level import UserGrouping, UserPoissonSampler, check_user_sampler

C = 1.0


def _update(rows_x, user_rows, group: bool) -> torch.Tensor:
    """The noiseless DP update (σ = 0, SGD lr 1, B_expected 1) of a linear model on the rows, grouped per user."""
    torch.manual_seed(0)
    net = nn.Linear(3, 1, bias=False)
    start = net.weight.detach().clone()
    engine = make_private(net, torch.optim.SGD(net.parameters(), lr=1.0), noise_multiplier=0.0, max_grad_norm=C,
                          expected_batch_size=1, sample_rate=0.5, noise_seed=0)
    if group:
        user_of = torch.as_tensor(user_rows)
        engine.group_rows = UserGrouping(user_of, records_per_user=10)
        engine.group_rows.set_records(torch.arange(len(user_rows)))
    engine.step(engine.module(rows_x).squeeze(1) * 100.0)   # large gradients: every row is clipped
    return start - net.weight.detach()


@pytest.mark.parametrize("n_records", [1, 3, 8])
def test_one_users_total_contribution_to_the_noised_sum_is_at_most_C(n_records):
    others = torch.tensor([[1.0, 0, 0], [0, 1.0, 0]])
    heavy = torch.tensor([[0, 0, 1.0]]).repeat(n_records, 1)
    with_user = _update(torch.cat([others, heavy]), [0, 1] + [2] * n_records, group=True)
    without_user = _update(others, [0, 1], group=True)
    assert (with_user - without_user).norm() <= C + 1e-5


def test_without_grouping_a_user_with_several_records_moves_the_sum_by_more_than_C():
    """The check above can fail: record-level clipping lets 8 records of one user contribute 8·C."""
    others = torch.tensor([[1.0, 0, 0], [0, 1.0, 0]])
    heavy = torch.tensor([[0, 0, 1.0]]).repeat(8, 1)
    diff = _update(torch.cat([others, heavy]), [0, 1] + [2] * 8, group=False) - _update(others, [0, 1], group=False)
    assert diff.norm() > 7 * C


def test_a_record_level_sampler_in_user_mode_is_caught():
    with pytest.raises(ValueError, match="samples records"):
        check_user_sampler(PoissonSampler(10, 0.5, seed=0))
    grouping = UserGrouping(torch.tensor([0, 0, 0, 1]), records_per_user=2)
    grouping.set_records(torch.tensor([0, 1, 2, 3]))   # three records of user 0 in one step: not user sampling
    p = nn.Parameter(torch.zeros(2))
    p.grad_sample = torch.ones(4, 2)
    with pytest.raises(ValueError, match="not drawn by the user-level sampler"):
        grouping([p])


def test_the_user_sampler_takes_at_most_k_records_per_sampled_user():
    sampler = UserPoissonSampler([list(range(10)), [10], [11, 12]], sample_rate=1.0, records_per_user=3,
                                 generator=torch.Generator().manual_seed(0))
    batch = sampler.sample()
    counts = torch.bincount(sampler.user_of[batch])
    assert counts.tolist() == [3, 1, 2]


def _user_data(tmp_path, users: int, per_user: int):
    from toolkit.samples import make_photo_dataset

    paths = make_photo_dataset(tmp_path, n_train=users * per_user, n_test=4)
    records = json.loads(open(paths["train"]).read())
    for i, record in enumerate(records):
        record["user_id"] = f"u{i // per_user}"
    open(paths["train"], "w").write(json.dumps(records))
    return paths


@pytest.mark.slow
def test_the_accountant_sees_users_not_records(tmp_path):
    from toolkit.train import TrainConfig, train

    paths = _user_data(tmp_path, users=8, per_user=3)
    result = train(TrainConfig(method="dual-priv", privacy_unit="user", user_records_per_step=2, epsilon=8.0,
                               steps=2, expected_batch_size=4, warm_start_steps=0, keep_tokens=4, progress=False,
                               train_data=paths["train"], eval_data=paths["test"],
                               image_folder=paths["image_folder"]))
    summary = result.summary()
    assert summary["n_records"] == 8 and result.sample_rate == 4 / 8          # users, not the 24 records
    assert result.epsilon_spent == pytest.approx(epsilon_for(result.noise_multiplier, 4 / 8, 2, 1e-5), rel=1e-3)
    assert "all records of one user" in summary["privacy_unit"] and "at most 2" in summary["privacy_unit"]


def test_user_mode_refuses_what_it_does_not_cover_yet(tmp_path):
    from toolkit.train import TrainConfig, train

    with pytest.raises(ValueError, match="needs train_data"):
        TrainConfig(method="dp-sgd", privacy_unit="user", steps=1).resolved()
    paths = _user_data(tmp_path, users=2, per_user=2)
    with pytest.raises(ValueError, match="dataset_size 1 is smaller than the training set's 2 users"):
        train(TrainConfig(method="dp-sgd", privacy_unit="user", dataset_size=1, steps=1, expected_batch_size=1,
                          warm_start_steps=0, train_data=paths["train"], image_folder=paths["image_folder"],
                          progress=False))
    with pytest.raises(ValueError, match="dp-zo"):
        train(TrainConfig(method="dp-zo", privacy_unit="user", steps=1, expected_batch_size=1, warm_start_steps=0,
                          train_data=paths["train"], image_folder=paths["image_folder"], progress=False))
