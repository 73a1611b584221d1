r"""Inference speed and memory of one config on the current backend.

  python benchmarks/inference.py --config configs/ms_rcnn_r50_caffe_fpn_1x_coco.py \
      [--batch-size 1] [--height 800 --width 1344] [--dtypes float32,bfloat16] [--iters 5]

Prints, per compute dtype: compile time (first call), steady-state seconds per
batch and images/s (median of ``--iters`` calls after the first), and peak
memory (device ``memory_stats()`` where the backend reports it, else the
process's max RSS). Weights are random (speed does not depend on them); the
image is a random 1333x800 picture padded to the landscape bucket.
"""

from __future__ import annotations

import resource
import statistics
import time

from absl import app
from absl import flags
import jax
import jax.numpy as jnp
from ml_collections import config_flags
import numpy as np

from msrcnn_jax.modeling.detector import MaskScoringRCNN, init_variables

_CONFIG = config_flags.DEFINE_config_file(
    'config', 'configs/ms_rcnn_r50_caffe_fpn_1x_coco.py', 'Model config.')
_BATCH = flags.DEFINE_integer('batch_size', 1, 'Images per call.')
_HEIGHT = flags.DEFINE_integer('height', 800, 'Resized image height.')
_WIDTH = flags.DEFINE_integer('width', 1333, 'Resized image width.')
_DTYPES = flags.DEFINE_list('dtypes', ['float32', 'bfloat16'],
                            'Compute dtypes to measure.')
_ITERS = flags.DEFINE_integer('iters', 5, 'Timed calls after compilation.')


def peak_memory_mb() -> str:
  dev = jax.devices()[0]
  stats = dev.memory_stats() if hasattr(dev, 'memory_stats') else None
  if stats and 'peak_bytes_in_use' in stats:
    return f'{stats["peak_bytes_in_use"] / 2**20:.0f} MiB device peak'
  rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
  return f'{rss:.0f} MiB process max RSS'


def main(argv):
  del argv
  config = _CONFIG.value
  b, h, w = _BATCH.value, _HEIGHT.value, _WIDTH.value
  ph, pw = -(-h // 32) * 32, -(-w // 32) * 32
  variables = init_variables(config, jax.random.key(0))
  rng = np.random.default_rng(0)
  images = np.zeros((b, ph, pw, 3), np.float32)
  images[:, :h, :w] = rng.normal(0, 50, (b, h, w, 3))
  img_shape = np.tile([[h, w]], (b, 1)).astype(np.int32)
  pad_shape = np.tile([[ph, pw]], (b, 1)).astype(np.int32)
  scale = np.ones((b, 4), np.float32)
  print(f'backend {jax.default_backend()} ({jax.devices()[0].device_kind}), '
        f'{config.name}, batch {b}, image {h}x{w} padded {ph}x{pw}')
  for name in _DTYPES.value:
    dtype = jnp.dtype(name)

    model = MaskScoringRCNN(config, dtype=dtype)

    @jax.jit
    def forward(variables, images, img_shape, pad_shape, scale):
      return model.apply(variables, images, img_shape, pad_shape, scale)

    t0 = time.perf_counter()
    jax.block_until_ready(forward(variables, images, img_shape, pad_shape,
                                  scale))
    compile_s = time.perf_counter() - t0
    times = []
    for _ in range(_ITERS.value):
      t0 = time.perf_counter()
      jax.block_until_ready(forward(variables, images, img_shape, pad_shape,
                                    scale))
      times.append(time.perf_counter() - t0)
    step = statistics.median(times)
    print(f'{name:>9}: compile+first {compile_s:7.1f} s | '
          f'{step * 1000:8.1f} ms/batch | {b / step:7.2f} images/s | '
          f'{peak_memory_mb()}')


if __name__ == '__main__':
  app.run(main)
