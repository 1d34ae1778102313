"""TorchGenerator against torch.randn: any shape, fewer than 16 values too, and the continued stream."""

import numpy as np
import pytest
import torch

from deploy_diff.runtime.rng import TorchGenerator, randn_tensor

SHAPES = [
    (1,),
    (2,),
    (7,),
    (15,),
    (16,),
    (17,),
    (31,),
    (32,),
    (33,),
    (100,),
    (2, 3, 8, 8),
    (1, 4, 64, 64),
    (3, 1, 5, 5),
    (8, 1, 16, 16),
    (),
]


@pytest.mark.parametrize("seed", [0, 1, 42, 1234567, 2**31 - 1, 2**32 + 7])
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_single_draw_equals_torch(seed, shape):
    expected = torch.randn(shape, generator=torch.Generator().manual_seed(seed)).numpy()
    ours = TorchGenerator(seed).randn(shape)
    assert ours.shape == expected.shape and ours.dtype == np.float32
    np.testing.assert_allclose(ours, expected, rtol=0, atol=1e-6)


@pytest.mark.parametrize("seed", [0, 3, 99])
def test_stream_continues_like_torch(seed):
    """Mixed small and large draws: the cached second normal of small draws survives a large draw."""
    sequence = [(1,), (20,), (1,), (3,), (2, 1, 4, 4), (5,), (16,), (1,), (1, 4, 8, 8), (2,)]
    g = torch.Generator().manual_seed(seed)
    ours = TorchGenerator(seed)
    for shape in sequence:
        np.testing.assert_allclose(ours.randn(shape), torch.randn(shape, generator=g).numpy(), rtol=0, atol=1e-6)


def test_manual_seed_resets_stream_and_cache():
    g = TorchGenerator(5)
    first = g.randn((3,))
    g.randn((1,))
    g.manual_seed(5)
    np.testing.assert_array_equal(g.randn((3,)), first)


def test_list_of_generators_draws_per_image():
    """diffusers' randn_tensor with a list: image i comes from generator i alone (batch-independent)."""
    shape = (3, 2, 4, 4)
    ours = randn_tensor(shape, generator=[TorchGenerator(s) for s in (10, 11, 12)])
    for i, s in enumerate((10, 11, 12)):
        alone = torch.randn((1,) + shape[1:], generator=torch.Generator().manual_seed(s)).numpy()
        np.testing.assert_allclose(ours[i : i + 1], alone, atol=1e-6)
    with pytest.raises(ValueError, match="one generator per image"):
        randn_tensor(shape, generator=[TorchGenerator(0), TorchGenerator(1)])


def test_numpy_generator_and_bad_generator():
    x = randn_tensor((2, 3), generator=np.random.default_rng(0))
    assert x.shape == (2, 3) and x.dtype == np.float32
    with pytest.raises(TypeError, match="TorchGenerator"):
        randn_tensor((2, 3), generator="seed")
    with pytest.raises(TypeError, match="int"):
        TorchGenerator(1.5)
