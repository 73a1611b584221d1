r"""How much the random-weight fixture backbone amplifies small perturbations.

The mmdetection fixtures (tests/fixtures/mmdet) use random weights. This
prints, at C2..C5 of the ``r50_caffe_tiny`` backbone on its first image, the
relative RMS difference from the float32 features of (a) the bfloat16
backbone and (b) the float32 backbone fed the input times (1 + 0.3% noise).
Where (b) grows as fast as (a), bfloat16 agreement with mmdetection cannot
be judged on these fixtures (``benchmarks/device_suite.py``'s parity note).

  python benchmarks/fixture_sensitivity.py
"""

from __future__ import annotations

import os
import sys

import jax
import jax.numpy as jnp
import numpy as np

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:0] = [_ROOT, os.path.join(_ROOT, 'tests')]


def _rel(ref, x):
  ref, x = np.asarray(ref, np.float32), np.asarray(x, np.float32)
  return float(np.sqrt(((ref - x) ** 2).mean()) / np.sqrt((ref ** 2).mean()))


def main():
  os.chdir(_ROOT)
  import conftest  # pylint: disable=g-import-not-at-top
  import test_end_to_end_parity as parity  # pylint: disable=g-import-not-at-top
  from msrcnn_jax.inference import batch_by_bucket  # pylint: disable=g-import-not-at-top
  from msrcnn_jax.modeling.backbone import resnet_from_config  # pylint: disable=g-import-not-at-top
  set_name = 'r50_caffe_tiny'
  cfg, variables, _ = parity._model(set_name)  # pylint: disable=protected-access
  items = parity._items(cfg, conftest.SET_IMAGES[set_name])  # pylint: disable=protected-access
  batch = next(iter(batch_by_bucket(items, 1, cfg.data)))
  bb_vars = {k: v['backbone'] for k, v in variables.items()}
  image = jnp.asarray(batch['image'])
  pad = jnp.asarray(batch['pad_shape'])
  noise = np.random.default_rng(0).standard_normal(image.shape)
  noisy = image * (1 + 0.003 * jnp.asarray(noise, jnp.float32))

  def run(dtype, x):
    return resnet_from_config(cfg.model.backbone, dtype).apply(bb_vars, x, pad)

  ref = run(jnp.float32, image)
  bf16 = run(jnp.bfloat16, image)
  f32_noisy = run(jnp.float32, noisy)
  print(f'{set_name}, {conftest.SET_IMAGES[set_name][0]}: relative RMS '
        'difference from the float32 features')
  for level, (r, b, n) in enumerate(zip(ref, bf16, f32_noisy), start=2):
    print(f'  C{level} {tuple(r.shape)}: bfloat16 {_rel(r, b):.3f} | '
          f'float32, input x (1 + 0.3% noise) {_rel(r, n):.3f}')


if __name__ == '__main__':
  main()
