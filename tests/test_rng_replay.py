"""maskfit.data.rng_replay: numpy's per-item generators' first draws, computed for many items at once."""
import numpy as np
import pytest

from maskfit.data.rng_replay import agrees_with_numpy, first_doubles, uniform_from


@pytest.mark.parametrize("seed, epoch", [(0, 0), (7, 3), (2**32 - 1, 2**32 - 1), (123456789, 40)])
def test_first_doubles_are_numpys_draws_bit_for_bit(seed, epoch):
    indices = np.concatenate([np.arange(300), [2**31, 2**32 - 1, 99_999_999]])
    fast = first_doubles(seed, epoch, indices, 3)
    assert fast.shape == (len(indices), 3) and fast.dtype == np.float64
    for row, i in zip(fast, indices.tolist()):
        rng = np.random.default_rng([seed, epoch, i])
        assert row.tolist() == [rng.random() for _ in range(3)], i


def test_uniform_from_is_generator_uniform():
    for i in range(200):
        d = first_doubles(5, 1, [i], 2)[0]
        rng = np.random.default_rng([5, 1, i])
        assert uniform_from(float(d[0]), np.log(1 / 3), np.log(3.0)) == rng.uniform(np.log(1 / 3), np.log(3.0))
        assert uniform_from(float(d[1]), 0.25, 1.0) == rng.uniform(0.25, 1.0)


def test_the_platform_check_and_the_range_errors():
    assert agrees_with_numpy(3, 4, np.arange(5), 2)
    with pytest.raises(ValueError, match=r"seed=4294967296 must lie in \[0, 2\*\*32\)"):
        first_doubles(2**32, 0, [0], 1)
    with pytest.raises(ValueError, match=r"indices in \[-1, 3\] must lie in \[0, 2\*\*32\)"):
        first_doubles(0, 0, np.array([-1, 3]), 1)
