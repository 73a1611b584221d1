r"""Per-chip memory of ResNeXt's 3x3 grouped convs compiled for one TPU chip.

Deviceless (libtpu, the ``tpu-aot`` extra, one libtpu process at a time):
each X-101-64x4d conv2 shape at 2 images of 800x1344, bfloat16, compiled as
``feature_group_count`` and with the groups packed into 128-lane blocks
(``msrcnn_jax.ops.grouped_conv``), forward and forward + backward. Prints
temporaries and XLA's FLOPs for each.

  JAX_PLATFORMS=cpu python benchmarks/grouped_conv.py [--topology v5e:2x2]
"""

from __future__ import annotations

import os
import sys

from absl import app
from absl import flags
import jax
from jax import lax
import jax.numpy as jnp

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from msrcnn_jax.ops import grouped_conv  # pylint: disable=g-import-not-at-top

_TOPOLOGY = flags.DEFINE_string('topology', 'v5e:2x2', 'TPU topology name.')

# (name, H, W, channels) of X-101-64x4d's conv2 per stage at 800x1344.
SHAPES = [('layer1', 200, 336, 256), ('layer2', 100, 168, 512),
          ('layer3', 50, 84, 1024), ('layer4', 25, 42, 2048)]
GROUPS = 64
BATCH = 2
_DN = ('NHWC', 'HWIO', 'NHWC')


def _figures(fn, *args):
  compiled = jax.jit(fn).lower(*args).compile()
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  return (compiled.memory_analysis().temp_size_in_bytes / 2 ** 20,
          (cost or {}).get('flops', 0.) / 1e9)


def main(argv):
  del argv
  from jax.experimental import topologies  # pylint: disable=g-import-not-at-top
  topo = topologies.get_topology_desc(topology_name=_TOPOLOGY.value,
                                      platform='tpu')
  sharding = jax.sharding.SingleDeviceSharding(topo.devices[0])
  print(f'one chip of {_TOPOLOGY.value}; {BATCH} images, bfloat16, '
        f'{GROUPS} groups; temporaries MiB / XLA GFLOP')
  for backward in (False, True):
    for name, h, w, c in SHAPES:
      x = jax.ShapeDtypeStruct((BATCH, h, w, c), jnp.bfloat16,
                               sharding=sharding)
      k = jax.ShapeDtypeStruct((3, 3, c // GROUPS, c), jnp.bfloat16,
                               sharding=sharding)
      s = grouped_conv.pack_factor(c // GROUPS, GROUPS)

      def grouped(x, k):
        return lax.conv_general_dilated(x, k, (1, 1), ((1, 1), (1, 1)),
                                        dimension_numbers=_DN,
                                        feature_group_count=GROUPS)

      def packed(x, k, s=s):
        return lax.conv_general_dilated(
            x, grouped_conv.block_diagonal_kernel(k, GROUPS, s), (1, 1),
            ((1, 1), (1, 1)), dimension_numbers=_DN,
            feature_group_count=GROUPS // s)

      row = []
      for fn in (grouped, packed):
        if backward:
          fn = (lambda f: jax.grad(lambda x, k: jnp.sum(
              f(x, k).astype(jnp.float32) ** 2), argnums=(0, 1)))(fn)
        row.append(_figures(fn, x, k))
      act = BATCH * h * w * c * 2 / 2 ** 20
      print(f'{name} {h}x{w}x{c} ({c // GROUPS}/group, packed x{s}) '
            f'{"fwd+bwd" if backward else "fwd    "}: activation {act:6.1f} '
            f'MiB | grouped {row[0][0]:7.1f} MiB {row[0][1]:6.1f} GFLOP | '
            f'packed {row[1][0]:7.1f} MiB {row[1][1]:6.1f} GFLOP', flush=True)


if __name__ == '__main__':
  app.run(main)
