"""Secret randomness with more than 32 bits of entropy, and secure mode's fresh OS randomness per draw.

A torch CPU generator is a Mersenne Twister, and ``manual_seed(s)`` / ``seed()`` initialise it from the low 32
bits of ``s`` only (``manual_seed(1)`` and ``manual_seed(1 + 2**32)`` give the same stream): a generator seeded
that way has at most 2³² possible noise and batch sequences, few enough to try them all. This module fills the
generator's whole 624-word state from a :class:`numpy.random.SeedSequence` instead, so its entropy is what the
sequence was given: 128 bits of OS entropy by default (:data:`ENTROPY_BITS`), or a shared 128-bit seed
(data-parallel ranks, :mod:`toolkit.distributed`), or a reproducible ``noise_seed`` (NOT private).

Secure mode (:func:`reseed_from_os`): before every noise draw and every Poisson batch the generator's whole
state is drawn again from the OS (``secrets``), so no draw can be predicted from another or from a saved state;
Opacus' floating-point-safe Gaussian (``secure_mode=True`` of its noise function) makes the draw itself.
(Opacus' own secure mode wants ``torchcsprng``, which is not built for current torch.) On CUDA the generator is
Philox with a 64-bit seed: that is the entropy per draw there.

Example::

    >>> import torch
    >>> from toolkit.secret_random import seeded_generator
    >>> a, b = seeded_generator(entropy=[7, 1]), seeded_generator(entropy=[7, 1])
    >>> torch.equal(torch.rand(3, generator=a), torch.rand(3, generator=b))
    True
"""
from __future__ import annotations

import secrets
import warnings

import numpy as np
import torch

ENTROPY_BITS = 128
_MT_WORDS = 624
_STATE_BYTES = 5056      # torch's CPU generator state: seed, left, seeded, next, 624 words (as uint64), normals
_WORDS_AT = 24           # byte offset of the 624 state words


def os_entropy(bits: int = ENTROPY_BITS) -> list[int]:
    """``bits`` of OS randomness as 32-bit words (a SeedSequence's entropy)."""
    return [secrets.randbits(32) for _ in range(-(-bits // 32))]


def _set_mersenne_state(generator: torch.Generator, words: np.ndarray) -> torch.Generator:
    state = generator.get_state().clone()
    if state.numel() != _STATE_BYTES:  # a torch with another state layout: fail loudly, never seed weakly
        raise RuntimeError(f"unexpected torch CPU generator state ({state.numel()} bytes, expected {_STATE_BYTES}): "
                           "toolkit.secret_random must be updated for this torch version")
    raw = state.numpy().view(np.uint8)
    raw[8:16] = np.frombuffer(np.array([1, 1], dtype=np.int32).tobytes(), dtype=np.uint8)  # left=1: twist next
    raw[16:24] = 0                                                                          # next word: 0
    raw[_WORDS_AT:_WORDS_AT + 8 * _MT_WORDS] = np.frombuffer(words.astype(np.uint64).tobytes(), dtype=np.uint8)
    raw[_WORDS_AT + 8 * _MT_WORDS:] = 0  # no cached normal sample from an earlier state
    generator.set_state(state)
    return generator


def philox_seed(sequence: np.random.SeedSequence) -> int:
    """The 64-bit seed of a CUDA (Philox) generator: two 32-bit words joined in Python integers. (In numpy,
    ``uint64 @ [1, 2**32]`` is a float64: it would keep 53 bits and could round up to 2**64, past the seed range.)"""
    low, high = (int(word) for word in sequence.generate_state(2, dtype=np.uint32))
    return low | high << 32


def seeded_generator(device: str | torch.device = "cpu", entropy=None) -> torch.Generator:
    """A generator whose whole state comes from ``SeedSequence(entropy)`` (default: :func:`os_entropy`)."""
    sequence = np.random.SeedSequence(os_entropy() if entropy is None else entropy)
    generator = torch.Generator(device=device)
    if torch.device(device).type == "cpu":
        return _set_mersenne_state(generator, sequence.generate_state(_MT_WORDS, dtype=np.uint32))
    generator.manual_seed(philox_seed(sequence))
    return generator


def secret_generator(noise_seed: int | None, stream: int, device: str | torch.device = "cpu") -> torch.Generator:
    """128 bits of OS entropy unless a (reproducible, NOT private) ``noise_seed`` is given; then each ``stream``
    (sampling, fusion noise) gets its own seed derived from it, as before issue 20 (seeded runs reproduce)."""
    if noise_seed is None:
        return seeded_generator(device)
    generator = torch.Generator(device=device)
    return generator.manual_seed(int(np.random.SeedSequence([int(noise_seed), stream]).generate_state(1)[0]))


def restore_generator_state(generator: torch.Generator, state: torch.Tensor, seeded: bool) -> None:
    """Continue a checkpoint's noise stream in ``generator``. A state saved on another device type (a CUDA Philox
    state is 16 bytes, a CPU Mersenne Twister's 5056) cannot go into it: a secret generator then keeps the fresh
    OS entropy it was made with (its noise stays secret and independent of every earlier draw, which is all the
    guarantee needs), a seeded one is refused (its stream cannot be continued, so the run would not reproduce)."""
    if state.numel() == generator.get_state().numel():
        generator.set_state(state)
        return
    saved, here = ("CUDA", "CPU") if generator.device.type == "cpu" else ("CPU", generator.device.type.upper())
    if seeded:
        raise ValueError(f"the checkpoint's noise generator was saved on {saved} and this run is on {here}: a run "
                         f"with a noise_seed resumes on the device type it was saved on (or drop the seed)")
    warnings.warn(f"the checkpoint's noise generator was saved on {saved}; on {here} the noise continues from fresh "
                  "OS entropy (still secret; the accounting is unchanged)", stacklevel=3)


def reseed_from_os(generator: torch.Generator) -> torch.Generator:
    """Secure mode: the generator's whole state drawn again from the OS, right before a secret draw."""
    fresh = seeded_generator(generator.device)
    generator.set_state(fresh.get_state())
    return generator
