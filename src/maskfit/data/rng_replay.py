"""The first uniform draws of many per-item generators at once, bit for bit as numpy makes them one at a time.

Token batching plans each step's bin in the training loop's main process (the DataLoader asks its batch
sampler there), and under random aspect crops an image's token grid changes every epoch: the planner replays
each item's crop from its generator ``np.random.default_rng([seed, epoch, index])``
(:func:`maskfit.data.datasets.item_rng`). Replaying it (~11 us to make the generator, then its draws) was ~70 % of the planner's time
(2026-12-02, 2-core CPU: 9-17 ms a bin of ~266 images, 4-5 ms with this module;
tools/probes/bin_planner.py FOLDER). The crop's size depends on its first two draws only
(ratio and area; the position comes after), so :func:`first_doubles` computes those draws for a whole epoch
with array arithmetic, and the planner does the rest of the size rule per item.

The computation follows numpy's published algorithms (numpy/random/bit_generator.pyx and
numpy/random/src/pcg64, numpy >= 1.17, whose bit streams NEP 19 keeps fixed):

1. ``SeedSequence(entropy)``: each word hashed into a pool of four 32-bit words (``hashmix``), every pool word
   mixed with every other (``mix``); ``generate_state(4, uint64)`` hashes the pool out again into eight 32-bit
   words, read little-endian as four 64-bit words;
2. ``PCG64``: state and increment are the 128-bit numbers (words 0, 1) and (words 2, 3); seeding is PCG's
   ``srandom_r`` (state 0, inc = 2 * increment + 1, step, add the state, step); each output steps the 128-bit
   LCG and returns XSL-RR of the new state;
3. ``Generator.random()`` is ``(next64 >> 11) * 2**-53``, and ``uniform(low, high)`` is
   ``low + (high - low) * random()``.

Tested against ``np.random.default_rng`` itself (tests/test_rng_replay.py); callers also check a few items
against the plain generator before trusting it (:func:`agrees_with_numpy`).
"""
from __future__ import annotations

import numpy as np

_M32 = 0xFFFFFFFF
# SeedSequence's hash constants (bit_generator.pyx)
_INIT_A, _MULT_A = 0x43B0D7E5, 0x931E8875
_INIT_B, _MULT_B = 0x8B51F9DD, 0x58F38DED
_MIX_MULT_L, _MIX_MULT_R = 0xCA01F9DD, 0x4973F715
_POOL_SIZE = 4
# PCG64's 128-bit LCG multiplier (pcg64.h: PCG_DEFAULT_MULTIPLIER_HIGH, _LOW)
_PCG_MULT_HIGH, _PCG_MULT_LOW = 2549297995355413924, 4865540595714422341


class _HashConstant:
    """The multiplier SeedSequence advances after every hash: the same sequence for every item, so a Python int."""

    def __init__(self, init: int, mult: int):
        self.value, self.mult = init, mult

    def next(self) -> tuple[int, int]:
        """(constant to xor with, constant to multiply by) of the next hash."""
        xor = self.value
        self.value = (self.value * self.mult) & _M32
        return xor, self.value


def _hashmix(values: np.ndarray, const: _HashConstant) -> np.ndarray:
    xor, mul = const.next()
    v = (values ^ np.uint32(xor)) * np.uint32(mul)  # uint32 arithmetic wraps, as the C does
    return v ^ (v >> np.uint32(16))


def _mix(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    r = np.uint32(_MIX_MULT_L) * x - np.uint32(_MIX_MULT_R) * y
    return r ^ (r >> np.uint32(16))


def _seed_state(entropy: list[np.ndarray]) -> list[np.ndarray]:
    """SeedSequence(entropy words).generate_state(4, uint64) for every item: four (N,) uint64 arrays."""
    if len(entropy) > _POOL_SIZE:
        raise ValueError(f"{len(entropy)} entropy words: this replay handles at most {_POOL_SIZE}")
    n = entropy[0].shape[0]
    const = _HashConstant(_INIT_A, _MULT_A)
    pool = [_hashmix(entropy[i] if i < len(entropy) else np.zeros(n, np.uint32), const) for i in range(_POOL_SIZE)]
    for src in range(_POOL_SIZE):
        for dst in range(_POOL_SIZE):
            if src != dst:
                pool[dst] = _mix(pool[dst], _hashmix(pool[src], const))
    const = _HashConstant(_INIT_B, _MULT_B)
    words = [_hashmix(pool[i % _POOL_SIZE], const) for i in range(8)]  # (N,) uint32 each
    return [words[2 * k].astype(np.uint64) | (words[2 * k + 1].astype(np.uint64) << np.uint64(32)) for k in range(4)]


def _mul64(a: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The full 128-bit product of two uint64 arrays, as (high, low) uint64 arrays (32-bit limbs)."""
    m32, s32 = np.uint64(_M32), np.uint64(32)
    a0, a1, b0, b1 = a & m32, a >> s32, b & m32, b >> s32
    p00, p01, p10, p11 = a0 * b0, a0 * b1, a1 * b0, a1 * b1
    mid = (p00 >> s32) + (p01 & m32) + (p10 & m32)
    low = (p00 & m32) | (mid << s32)
    high = p11 + (p01 >> s32) + (p10 >> s32) + (mid >> s32)
    return high, low


def _add128(ah, al, bh, bl) -> tuple[np.ndarray, np.ndarray]:
    low = al + bl
    return ah + bh + (low < al).astype(np.uint64), low


def _lcg_step(sh, sl, ih, il) -> tuple[np.ndarray, np.ndarray]:
    """state * multiplier + increment, mod 2**128."""
    mh, ml = np.uint64(_PCG_MULT_HIGH), np.uint64(_PCG_MULT_LOW)
    ph, pl = _mul64(sl, np.full_like(sl, ml))
    ph = ph + sh * ml + sl * mh  # the cross terms, mod 2**64
    return _add128(ph, pl, ih, il)


def _xsl_rr(sh: np.ndarray, sl: np.ndarray) -> np.ndarray:
    rot = sh >> np.uint64(58)  # state >> 122
    v = sh ^ sl
    return (v >> rot) | (v << ((np.uint64(64) - rot) & np.uint64(63)))


def first_doubles(seed: int, epoch: int, indices: np.ndarray, count: int) -> np.ndarray:
    """(N, count) float64: the first ``count`` values of ``np.random.default_rng([seed, epoch, i]).random()``
    for each ``i`` of ``indices`` (N,). ``seed``, ``epoch`` and the indices must each fit in 32 bits (numpy
    makes a larger one two entropy words; this replay does not)."""
    idx = np.asarray(indices)
    for name, value in (("seed", seed), ("epoch", epoch)):
        if not 0 <= int(value) <= _M32:
            raise ValueError(f"{name}={value} must lie in [0, 2**32) for the vectorised replay; use item_rng")
    if idx.size and (idx.min() < 0 or idx.max() > _M32):
        raise ValueError(f"indices in [{idx.min()}, {idx.max()}] must lie in [0, 2**32) for the vectorised replay")
    n = idx.shape[0]
    entropy = [np.full(n, seed, np.uint32), np.full(n, epoch, np.uint32), idx.astype(np.uint32)]
    s0, s1, i0, i1 = _seed_state(entropy)  # 128-bit seed (s0 high, s1 low), 128-bit increment (i0, i1)
    one = np.uint64(1)
    inc_h, inc_l = (i0 << one) | (i1 >> np.uint64(63)), (i1 << one) | one
    zero = np.zeros(n, np.uint64)
    sh, sl = _lcg_step(zero, zero, inc_h, inc_l)
    sh, sl = _add128(sh, sl, s0, s1)
    sh, sl = _lcg_step(sh, sl, inc_h, inc_l)
    out = np.empty((n, count), np.float64)
    for k in range(count):
        sh, sl = _lcg_step(sh, sl, inc_h, inc_l)
        out[:, k] = (_xsl_rr(sh, sl) >> np.uint64(11)).astype(np.float64) * (1.0 / 9007199254740992.0)
    return out


def uniform_from(double: float, low: float, high: float) -> float:
    """``Generator.uniform(low, high)`` given the ``random()`` value it draws (numpy's random_uniform)."""
    return low + (high - low) * double


def agrees_with_numpy(seed: int, epoch: int, indices: np.ndarray, count: int) -> bool:
    """Whether :func:`first_doubles` gives numpy's own draws for these items (a run-time check of the platform)."""
    fast = first_doubles(seed, epoch, indices, count)
    for row, i in zip(fast, np.asarray(indices).tolist()):
        rng = np.random.default_rng([seed, epoch, i])
        if any(float(v) != rng.random() for v in row):
            return False
    return True
