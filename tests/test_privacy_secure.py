"""Secret randomness (issue 20): secret generators hold 128 bits of OS entropy (torch's own seeding keeps 32),
data-parallel ranks share a ≥ 128-bit secret, and secure mode refuses a seed and draws every noise sample and
every Poisson batch from a generator state freshly taken from the OS.

Each test was checked to fail when the claim it protects is broken in the code."""
from __future__ import annotations

import hashlib

import numpy as np
import pytest
import torch

from fast_run import fast
import toolkit.privacy.update_pruning as update_pruning_module
import toolkit.secret_random as secret_random
import toolkit.zo as zo_module
from toolkit.config import TrainConfig
from toolkit.distributed import DistributedContext, shared_secret_entropy, shared_secret_generator
from toolkit.privacy import PoissonSampler
from toolkit.secret_random import ENTROPY_BITS, seeded_generator
from toolkit.train import make_sampler, train

ALL_RECORDS = dict(steps=2, train_limit=16, eval_limit=8, warm_start_steps=0, expected_batch_size=16, progress=False)
FAST = fast(steps=2)
ONE_PROCESS = DistributedContext(rank=0, world_size=1, local_rank=0)


def _stream(generator) -> torch.Tensor:
    return torch.rand(2000, generator=generator)


# ------------------------------------------------------------------------------------- 128-bit generators

def test_torch_seeds_keep_32_bits_so_secret_generators_fill_the_whole_state():
    # why the module exists: manual_seed ignores every bit above the 32nd
    assert torch.equal(_stream(torch.Generator().manual_seed(1)), _stream(torch.Generator().manual_seed(1 + 2 ** 32)))
    # a seeded_generator depends on every word of its entropy, the fourth 32-bit word included
    assert not torch.equal(_stream(seeded_generator(entropy=[1, 0, 0, 0])),
                           _stream(seeded_generator(entropy=[1, 0, 0, 1])))
    assert torch.equal(_stream(seeded_generator(entropy=[5, 6])), _stream(seeded_generator(entropy=[5, 6])))
    assert len(secret_random.os_entropy()) * 32 >= ENTROPY_BITS >= 128
    # and its state is not one a 32-bit seed makes: after manual_seed(s) the Mersenne Twister's words follow
    # w[i] = 1812433253 * (w[i-1] ^ (w[i-1] >> 30)) + i (mod 2^32) from w[0] = s, so 2^32 states in all
    for generator in (seeded_generator(), seeded_generator(entropy=[5, 6])):
        assert not _is_a_32_bit_seed_state(generator)
    assert _is_a_32_bit_seed_state(torch.Generator().manual_seed(12345))


def _is_a_32_bit_seed_state(generator) -> bool:
    words = np.frombuffer(generator.get_state().numpy().tobytes()[24:24 + 8 * 624], dtype=np.uint64)
    return all(int(words[i]) == (1812433253 * (int(words[i - 1]) ^ (int(words[i - 1]) >> 30)) + i) % 2 ** 32
               for i in range(1, 8))


def test_a_cuda_generator_seed_keeps_all_64_bits_of_its_two_words():
    # the Philox seed on a GPU: every bit of both 32-bit words, never a float's 53 (nor a rounding up to 2**64)
    assert secret_random.philox_seed(_Words([0xFFFFFFFF, 0xFFFFFFFF])) == 2 ** 64 - 1
    torch.Generator().manual_seed(2 ** 64 - 1)   # the largest seed is one a generator takes
    seeds = [secret_random.philox_seed(np.random.SeedSequence([i, 7])) for i in range(400)]
    words = [np.random.SeedSequence([i, 7]).generate_state(2, dtype=np.uint32) for i in range(400)]
    assert seeds == [int(w[0]) + (int(w[1]) << 32) for w in words]
    assert len({seed % 2 ** 12 for seed in seeds}) > 300    # the low bits vary (a float64 would zero them)


class _Words(np.random.SeedSequence):
    """A SeedSequence whose state words are given: the extreme values a real one can produce."""

    def __init__(self, words):
        super().__init__(0)
        self._words = np.array(words, dtype=np.uint32)

    def generate_state(self, n_words, dtype=np.uint32):
        return self._words[:n_words].astype(dtype)


def test_the_sampler_of_a_private_run_is_seeded_with_128_bits_of_os_entropy(monkeypatch):
    seen = []
    real = secret_random.os_entropy

    def spy(bits=ENTROPY_BITS):
        seen.append(bits)
        return real(bits)

    monkeypatch.setattr(secret_random, "os_entropy", spy)
    sampler = make_sampler(TrainConfig(method="dp-sgd", **FAST).resolved(), 32, 32, 0.25)
    assert seen == [128]
    other = make_sampler(TrainConfig(method="dp-sgd", **FAST).resolved(), 32, 32, 0.25)
    assert [b.tolist() for b in sampler.batches(5)] != [b.tolist() for b in other.batches(5)]


def test_data_parallel_secret_seeds_have_at_least_128_bits_and_decide_the_generator():
    words = shared_secret_entropy(ONE_PROCESS)
    assert len(words) * 32 >= 128 and all(0 <= w < 2 ** 32 for w in words)
    assert shared_secret_entropy(ONE_PROCESS) != words  # fresh OS entropy each time
    a, b = shared_secret_generator(None, 1, ONE_PROCESS), shared_secret_generator(None, 1, ONE_PROCESS)
    assert not torch.equal(_stream(a), _stream(b))
    seeded = [_stream(shared_secret_generator(3, 1, ONE_PROCESS)) for _ in range(2)]
    assert torch.equal(*seeded)  # a noise_seed reproduces (and is not private)


# ------------------------------------------------------------------------------------------- secure mode

def test_secure_mode_refuses_a_seed_everywhere():
    with pytest.raises(ValueError, match="secure_mode .*noise_seed must be None"):
        TrainConfig(method="dp-sgd", secure_mode=True, noise_seed=0, **FAST).resolved()
    with pytest.raises(ValueError, match="a seed is refused"):
        PoissonSampler(10, 0.5, seed=0, secure=True)


def _state_hashes_at_each_draw(monkeypatch, module) -> list[str]:
    """Record the noise generator's state right before every noise draw of ``module``."""
    hashes = []
    real = module.opacus_noise

    def spy(**kwargs):
        hashes.append(hashlib.sha1(kwargs["generator"].get_state().numpy().tobytes()).hexdigest())
        return real(**kwargs)

    monkeypatch.setattr(module, "opacus_noise", spy)
    return hashes


@pytest.mark.parametrize("method,module", [("dp-sgd", update_pruning_module), ("dp-zo", zo_module)])
def test_secure_mode_takes_a_fresh_os_state_before_every_noise_draw(method, module, monkeypatch):
    # the OS is made to answer the same words every time: every draw must then start from the same state
    monkeypatch.setattr(secret_random, "os_entropy", lambda bits=ENTROPY_BITS: [7] * (bits // 32))
    hashes = _state_hashes_at_each_draw(monkeypatch, module)
    train(TrainConfig(method=method, epsilon=3.0, secure_mode=True, **FAST))
    assert len(hashes) >= 2 and len(set(hashes)) == 1
    hashes.clear()
    train(TrainConfig(method=method, epsilon=3.0, **FAST))  # not secure: one generator, consumed draw by draw
    assert len(set(hashes)) == len(hashes) >= 2


def test_secure_mode_takes_a_fresh_os_state_before_every_poisson_batch(monkeypatch):
    monkeypatch.setattr(secret_random, "os_entropy", lambda bits=ENTROPY_BITS: [7] * (bits // 32))
    sampler = make_sampler(TrainConfig(method="dp-sgd", secure_mode=True, **FAST).resolved(), 32, 32, 0.25)
    batches = [b.tolist() for b in sampler.batches(4)]
    assert all(b == batches[0] for b in batches)  # same OS answer, same batch: the state came from the OS


def test_two_secure_runs_differ():
    a, b = (torch.cat([p.detach().reshape(-1) for p in train(TrainConfig(
        method="dp-sgd", epsilon=3.0, secure_mode=True, **ALL_RECORDS)).bundle.model.parameters() if p.requires_grad])
        for _ in range(2))
    assert not torch.equal(a, b)
