"""Grouped convs packed into 128-lane blocks equal the grouped conv.

``ops.grouped_conv`` (used on TPUs, where ResNeXt's narrow groups need up to
64x their activation in padded temporaries) must compute exactly what
``feature_group_count`` computes, with the same parameters and gradients.
Reference: each group convolved on its own slice (``feature_group_count=1``),
in float64. Cost: ~3 s.
"""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

from msrcnn_jax.modeling import layers
from msrcnn_jax.ops import grouped_conv

_DN = ('NHWC', 'HWIO', 'NHWC')


@pytest.mark.parametrize('width,groups,expected', [
    (4, 64, 32),    # X-101-64x4d layer1: 2 blocks of 128 channels
    (8, 64, 16),    # layer2
    (16, 64, 8),    # layer3
    (32, 64, 1),    # layer4: wide enough, not packed
    (4, 32, 32),    # X-101-32x4d layer1: one dense block of 128
    (4, 4, 4),      # the tiny fixture (4 groups of 4)
    (24, 5, 5),     # 5 x 24 = 120 <= 128
    (12, 6, 6),     # 6 x 12 = 72 <= 128
    (12, 14, 7),    # the largest divisor of 14 with s * 12 <= 128 is 7
    (64, 1, 1),     # not grouped
])
def test_pack_factor(width, groups, expected):
  assert grouped_conv.pack_factor(width, groups) == expected


def _per_group_reference(x, k, groups, stride):
  """Each group's slice convolved alone: the definition of a grouped conv."""
  width = k.shape[2]
  outs = k.shape[3] // groups
  ys = []
  for g in range(groups):
    ys.append(lax.conv_general_dilated(
        x[..., g * width:(g + 1) * width], k[..., g * outs:(g + 1) * outs],
        (stride, stride), ((1, 1), (1, 1)), dimension_numbers=_DN))
  return jnp.concatenate(ys, axis=-1)


@pytest.mark.parametrize('width,groups,outs,stride', [
    (4, 16, 4, 1), (4, 8, 8, 2), (16, 12, 16, 1)])
def test_packed_equals_grouped_conv_float64(width, groups, outs, stride,
                                            monkeypatch):
  monkeypatch.setattr(grouped_conv, 'packing_enabled', lambda: True)
  rng = np.random.default_rng(width * groups + stride)
  with jax.enable_x64(True):
    x = jnp.asarray(rng.standard_normal((2, 9, 11, width * groups)))
    k = jnp.asarray(rng.standard_normal((3, 3, width, outs * groups)))
    s = grouped_conv.pack_factor(width, groups)
    assert s > 1
    packed = grouped_conv.block_diagonal_kernel(k, groups, s)
    assert packed.shape == (3, 3, s * width, outs * groups)
    # Off-diagonal blocks are exactly zero: 1 - 1/s of the packed kernel.
    assert int(jnp.sum(packed != 0)) == int(jnp.sum(k != 0))

    def f(x, k):
      return grouped_conv.conv_general_dilated(
          x, k, (stride, stride), ((1, 1), (1, 1)), dimension_numbers=_DN,
          feature_group_count=groups)

    y = f(x, k)
    ref = _per_group_reference(x, k, groups, stride)
    np.testing.assert_allclose(np.asarray(y), np.asarray(ref), rtol=0,
                               atol=1e-12)
    # Gradients reach the grouped kernel's own entries only, as in the
    # grouped conv.
    w = jnp.asarray(rng.standard_normal(ref.shape))
    gx, gk = jax.grad(lambda x, k: jnp.sum(f(x, k) * w), argnums=(0, 1))(x, k)
    rx, rk = jax.grad(lambda x, k: jnp.sum(
        _per_group_reference(x, k, groups, stride) * w), argnums=(0, 1))(x, k)
    np.testing.assert_allclose(np.asarray(gx), np.asarray(rx), atol=1e-10)
    np.testing.assert_allclose(np.asarray(gk), np.asarray(rk), atol=1e-10)


def test_flax_conv_module_packs_on_tpu_only(monkeypatch):
  """``layers.conv(groups>1)`` keeps its parameters and float32 results
  whether or not packing is on (on the CPU it is off by default)."""
  assert not grouped_conv.packing_enabled()   # CPU backend in the tests
  module = layers.conv(64, 3, stride=1, groups=16, use_bias=False)
  x = jnp.asarray(np.random.default_rng(0).standard_normal((1, 12, 10, 64)),
                  jnp.float32)
  variables = module.init(jax.random.PRNGKey(0), x)
  assert variables['params']['kernel'].shape == (3, 3, 4, 64)
  native = module.apply(variables, x)
  calls = []
  monkeypatch.setattr(grouped_conv, 'packing_enabled',
                      lambda: calls.append(1) or True)
  packed = module.apply(variables, x)
  assert calls   # the hook ran with packing on
  assert nn.Conv is type(module)
  np.testing.assert_allclose(np.asarray(packed), np.asarray(native),
                             rtol=1e-5, atol=1e-5)
