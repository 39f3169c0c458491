"""Exact "drop the k smallest |x|" keep-masks over many tensors, with a bounded transient (mechanism 2's selection).

The k-th smallest magnitude is found by a radix select over the float bits: for a non-negative IEEE float, the
bit pattern read as a signed integer orders exactly like the value, so the threshold is found 16 bits at a time
with a 65536-bin histogram per pass over the data. One pass is enough for bf16/fp16 inputs (16 bits); for fp32
(fp64) the first pass finds the threshold's top 16 bits, and when at most ``_BLOCK_ELEMENTS`` values share them
(the usual case: a 16-bit bin is 1/128 of a binade) the mask pass gathers those few candidates with their
positions and finishes the selection on them; only when more share them (e.g. masses of equal values) is the next
16-bit digit counted in another pass. Every pass walks the tensors in blocks of at most ``_BLOCK_ELEMENTS``
elements (a large tensor is cut into pieces, small neighbouring tensors are copied into one block), so the extra
memory is O(block), a few tens of MB whatever the number of trainable parameters, instead of a concatenated copy
plus ``kthvalue`` and an int64 ``cumsum`` of everything (≈ 21 bytes per parameter).

Rule (the same as the former ``kthvalue`` + ``cumsum`` implementation, bit for bit):

* magnitudes are compared exactly: in the inputs' own dtype when all are bf16 (or all fp16), whose values fp32
  represents exactly (so the order is fp32's), else in ``promote_types(float32, every input dtype)``;
* exactly ``k`` coordinates are dropped: every coordinate below the threshold, then the coordinates *equal* to it
  in flattened order (tensor by tensor in list order, row-major inside a tensor), earliest first;
* NaN magnitudes order above +inf (they are kept unless nearly everything is dropped); -0.0 equals +0.0.

Example::

    >>> import torch
    >>> from toolkit.privacy.magnitude_select import keep_largest
    >>> [m.tolist() for m in keep_largest([torch.tensor([1.0, -1.0, 3.0]), torch.tensor([0.5, 1.0])], 3)]
    [[False, False, True], [False, True]]
"""
from __future__ import annotations

import torch

# 2**20 elements per block: ≈ 4 MiB of fp32 magnitudes plus same-sized temporaries; ≤ 24 MiB of transients in all.
_BLOCK_ELEMENTS = 1 << 20
_DIGIT_BITS = 16
_SAMPLE = 1 << 16  # magnitudes sampled to bracket the threshold (the fast path of keep_largest)
_INT_FOR = {torch.float16: torch.int16, torch.bfloat16: torch.int16, torch.float32: torch.int32,
            torch.float64: torch.int64}


def comparison_dtype(tensors: list[torch.Tensor]) -> torch.dtype:
    """The dtype magnitudes are compared in (exactly, see the module docstring)."""
    dtypes = {t.dtype for t in tensors}
    if len(dtypes) == 1 and next(iter(dtypes)) in (torch.bfloat16, torch.float16):
        return next(iter(dtypes))
    dtype = torch.float32
    for d in dtypes:
        dtype = torch.promote_types(dtype, d)
    if dtype not in _INT_FOR:
        raise TypeError(f"cannot rank magnitudes of dtype {dtype}; give float tensors")
    return dtype


def _plan_blocks(tensors: list[torch.Tensor], block: int) -> list[list[tuple[int, int, int]]]:
    """Blocks of pieces ``(tensor index, start, stop)`` in flattened order, ≤ ``block`` elements, one device each."""
    blocks, current, size, device = [], [], 0, None
    for i, t in enumerate(tensors):
        n = t.numel()
        for start in range(0, n, block):
            stop = min(n, start + block)
            if current and (size + stop - start > block or t.device != device):
                blocks.append(current)
                current, size = [], 0
            current.append((i, start, stop))
            size += stop - start
            device = t.device
    if current:
        blocks.append(current)
    return blocks


def _block_bits(flats: list[torch.Tensor], pieces, dtype: torch.dtype) -> torch.Tensor:
    """|x| of one block in ``dtype``, its bits as a signed integer tensor (monotone in the magnitude)."""
    if len(pieces) == 1 and flats[pieces[0][0]].dtype == dtype:
        i, start, stop = pieces[0]
        return flats[i][start:stop].abs().view(_INT_FOR[dtype])
    size = sum(stop - start for _, start, stop in pieces)
    buf = torch.empty(size, dtype=dtype, device=flats[pieces[0][0]].device)
    offset = 0
    for i, start, stop in pieces:
        buf[offset:offset + stop - start].copy_(flats[i][start:stop])
        offset += stop - start
    return buf.abs_().view(_INT_FOR[dtype])


def _threshold_bin(flats, blocks, dtype: torch.dtype, k: int) -> tuple[int, int, int]:
    """Radix select of the k-th smallest magnitude (1-based), 16 bits per pass, from the top.

    Returns ``(prefix, shift, rank)``: the k-th smallest has ``bits >> shift == prefix`` and is the ``rank``-th
    smallest (≥ 1) of the values sharing that prefix. Stops at ``shift == 0`` (exact threshold) or as soon as at
    most ``_BLOCK_ELEMENTS`` values share the prefix (the mask pass then resolves them, see :func:`keep_largest`).
    """
    width = torch.iinfo(_INT_FOR[dtype]).bits
    bins = 1 << _DIGIT_BITS
    prefix, rank = 0, k
    for level, shift in enumerate(range(width - _DIGIT_BITS, -1, -_DIGIT_BITS)):
        hist = None
        for pieces in blocks:
            bits = _block_bits(flats, pieces, dtype)
            if level > 0:  # only the elements whose higher digits equal the threshold's so far
                bits = bits[(bits >> (shift + _DIGIT_BITS)) == prefix]
            digits = bits >> shift if level == 0 else (bits >> shift) & (bins - 1)
            counts = torch.bincount(digits, minlength=bins)
            hist = counts if hist is None else hist + counts.to(hist.device)
        cumulative = hist.cumsum(0)
        digit = int(torch.searchsorted(cumulative, torch.tensor([rank], device=cumulative.device))[0])
        rank -= int(cumulative[digit - 1]) if digit > 0 else 0
        prefix = (prefix << _DIGIT_BITS) | digit
        if shift == 0 or int(hist[digit]) <= _BLOCK_ELEMENTS:
            return prefix, shift, rank
    raise AssertionError("unreachable: the last digit has shift 0")


def keep_largest(tensors: list[torch.Tensor], k: int) -> list[torch.Tensor]:
    """Boolean keep-masks (True = keep), one per tensor, that drop exactly the ``k`` smallest-|x| coordinates of
    all ``tensors`` together (ties: the module docstring's rule). Extra memory O(``_BLOCK_ELEMENTS``)."""
    tensors = list(tensors)
    total = sum(t.numel() for t in tensors)
    if isinstance(k, bool) or not isinstance(k, int) or not 0 <= k <= total:
        raise ValueError(f"k must be an integer in [0, {total}], got {k!r}")
    masks = [torch.ones(t.shape, dtype=torch.bool, device=t.device) for t in tensors]
    if k == 0:
        return masks
    dtype = comparison_dtype(tensors)
    flats = [t.detach().reshape(-1) for t in tensors]
    blocks = _plan_blocks(tensors, _BLOCK_ELEMENTS)
    if _bracketed_selection(masks, tensors, flats, blocks, dtype, k):
        return masks
    prefix, shift, rank = _threshold_bin(flats, blocks, dtype, k)
    ties_to_drop = rank  # exact threshold (shift 0): the first `rank` values equal to it are dropped
    candidate_bits, candidate_positions = [], []
    offset = 0  # flattened position of the block's first element over all tensors
    for pieces in blocks:
        bits = _block_bits(flats, pieces, dtype)
        top = bits >> shift if shift else bits
        if shift == 0 and ties_to_drop == 0:
            keep = top >= prefix
        else:
            keep = top > prefix
            in_bin = (top == prefix).nonzero().reshape(-1)
            if shift == 0:
                keep[in_bin[ties_to_drop:]] = True  # the earliest ties are dropped, later ones kept
                ties_to_drop -= min(ties_to_drop, len(in_bin))
            else:  # at most _BLOCK_ELEMENTS values in all share the prefix: gather them, rank them below
                candidate_bits.append(bits[in_bin])
                candidate_positions.append(in_bin + offset)
        start_in_block = 0
        for i, start, stop in pieces:
            masks[i].view(-1)[start:stop] = keep[start_in_block:start_in_block + stop - start]
            start_in_block += stop - start
        offset += bits.numel()
    if shift:
        _keep_candidates(masks, tensors, candidate_bits, candidate_positions, rank)
    return masks


def _bracketed_selection(masks, tensors, flats, blocks, dtype: torch.dtype, k: int) -> bool:
    """The fast path, one pass: bracket the k-th smallest between two quantiles of a fixed-seed sample of
    ``_SAMPLE`` magnitudes, write keep=True above the bracket, count what lies below it, and gather the values inside
    it (with positions) to rank exactly. Returns False, with ``masks`` to be rewritten, when the bracket missed the
    k-th value or held more than ``_BLOCK_ELEMENTS`` values; the result never depends on the sample, only the speed."""
    total = sum(t.numel() for t in tensors)
    generator = torch.Generator().manual_seed(0)
    sample = torch.cat([flats[i][torch.randint(len(flats[i]), (max(1, _SAMPLE * len(flats[i]) // total),),
                                               generator=generator).to(flats[i].device)].to(masks[0].device)
                        for i in range(len(flats)) if len(flats[i])])
    sample = sample.to(dtype).abs().view(_INT_FOR[dtype]).sort().values
    m, q = len(sample), k / total
    slack = 4.0 * (q * (1.0 - q) / m) ** 0.5 + 2.0 / m
    lo = int(sample[max(0, int((q - slack) * m))])
    hi = int(sample[min(m - 1, int((q + slack) * m) + 1)])
    below, gathered, candidate_bits, candidate_positions, offset = 0, 0, [], [], 0
    for pieces in blocks:
        bits = _block_bits(flats, pieces, dtype)
        at_least_lo = bits >= lo
        keep = bits > hi
        below += bits.numel() - int(at_least_lo.sum())
        inside = (at_least_lo ^ keep).nonzero().reshape(-1)  # lo <= |x| <= hi (keep implies at_least_lo)
        gathered += len(inside)
        if gathered > _BLOCK_ELEMENTS:
            return False
        candidate_bits.append(bits[inside])
        candidate_positions.append(inside + offset)
        start_in_block = 0
        for i, start, stop in pieces:
            masks[i].view(-1)[start:stop] = keep[start_in_block:start_in_block + stop - start]
            start_in_block += stop - start
        offset += bits.numel()
    rank = k - below  # the k-th smallest is the rank-th smallest inside the bracket, if it is inside at all
    if not 1 <= rank <= gathered:
        return False
    _keep_candidates(masks, tensors, candidate_bits, candidate_positions, rank)
    return True


def _keep_candidates(masks, tensors, candidate_bits, candidate_positions, rank: int) -> None:
    """Set keep=True on the candidates after the ``rank`` smallest (by value, then position: a stable sort of
    values gathered in flattened order)."""
    device = masks[0].device
    bits = torch.cat([b.to(device) for b in candidate_bits])
    positions = torch.cat([p.to(device) for p in candidate_positions])
    kept = positions[torch.sort(bits, stable=True).indices[rank:]]
    sizes = torch.tensor([0] + [t.numel() for t in tensors], device=device)
    starts = sizes.cumsum(0)[:-1]
    owner = torch.searchsorted(starts, kept, right=True) - 1  # empty tensors share a start: the last one owns it
    for i in owner.unique().tolist():
        mine = kept[owner == i] - starts[i]
        masks[i].view(-1)[mine.to(masks[i].device)] = True
