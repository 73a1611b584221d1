"""No non-finite value from padding, forward or backward (issue 10).

Images smaller than their shape bucket, ground truth padded to
``max_instances``, images without any ground truth and degenerate boxes must
all give finite losses and finite gradients for every parameter. The case
that found it (``tests/fixtures/cases/nan_padded_images``, from
mmdetection#2739 / #3315): 96x128 images in the 128x128 bucket with nothing
frozen gave ``grad_norm=nan`` at step 0, because the stem's max-pool saw
-inf in the bucket padding and layer1's kernel gradients became -inf x 0.
"""

import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from msrcnn_jax.data import pipeline
from msrcnn_jax.modeling import backbone as backbone_lib
from msrcnn_jax.training.task import DetectorTask

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CASE = os.path.join(ROOT, 'tests', 'fixtures', 'cases', 'nan_padded_images')
sys.path.insert(0, os.path.join(ROOT, 'configs'))
import quickstart_synthetic  # pylint: disable=g-import-not-at-top,wrong-import-position


def _config(frozen_stages):
  cfg = quickstart_synthetic.get_config()
  cfg.model.backbone.frozen_stages = frozen_stages
  # Residual branches start non-zero so that every layer gets gradient.
  cfg.model.backbone.zero_init_residual = False
  cfg.data.synthetic.update(image_size=(96, 128), num_train=8, cache=False)
  cfg.train.global_batch_size = 4
  return cfg


def _batch_variants(batch):
  """The padding kinds: plain, an image without GT, no GT at all, empty GT
  masks, a degenerate (zero-width) GT marked valid, an image much smaller
  than the bucket."""
  def copy():
    return {k: np.array(v) for k, v in batch.items()}
  out = {'plain': copy()}
  b = copy()
  b['gt_valid'][0] = False
  out['image_without_gt'] = b
  b = copy()
  b['gt_valid'][:] = False
  out['batch_without_gt'] = b
  b = copy()
  b['gt_masks'][:] = 0
  out['empty_gt_masks'] = b
  b = copy()
  b['gt_boxes'][0, 0] = [10., 10., 10., 30.]
  b['gt_valid'][0, 0] = True
  out['zero_width_gt'] = b
  b = copy()
  b['image'][0, 32:] = 0.
  b['image'][0, :, 32:] = 0.
  b['img_shape'][0] = b['pad_shape'][0] = (32, 32)
  b['gt_valid'][0] = False
  b['gt_valid'][0, 0] = True
  b['gt_boxes'][0, 0] = [2., 2., 20., 20.]
  out['tiny_image'] = b
  return out


def _non_finite_leaves(tree):
  return [jax.tree_util.keystr(path)
          for path, x in jax.tree_util.tree_leaves_with_path(tree)
          if not np.all(np.isfinite(np.asarray(x, np.float32)))]


@pytest.mark.parametrize('compute_dtype', ['float32', 'bfloat16'])
@pytest.mark.parametrize('frozen_stages', [-1, 0, 1])
def test_padded_batches_give_finite_losses_and_gradients(frozen_stages,
                                                         compute_dtype):
  cfg = _config(frozen_stages)
  it = pipeline.make_train_iterator(cfg)
  batch = next(it)
  it.close()
  # The premise: every image is smaller than its bucket.
  assert batch['image'].shape[1:3] == (128, 128)
  assert np.all(batch['pad_shape'] == (96, 128))
  task = DetectorTask(cfg)
  variables = task.init_variables(jax.random.key(0))
  dtype = jnp.dtype(compute_dtype)

  def objective(params, b):
    return task.loss_fn(params, variables['batch_stats'], b,
                        jax.random.key(1), dtype)

  grad_fn = jax.jit(jax.value_and_grad(objective, has_aux=True))
  for name, b in _batch_variants(batch).items():
    (loss, metrics), grads = grad_fn(variables['params'], b)
    assert np.isfinite(float(loss)), (name, float(loss))
    bad = [k for k, v in metrics.items()
           if not np.all(np.isfinite(np.asarray(v, np.float32)))]
    assert not bad, (name, bad)
    assert not _non_finite_leaves(grads), (name, _non_finite_leaves(grads))
    # The trainable stem and layer1 really receive gradient when nothing is
    # frozen (the test would pass vacuously if they were cut off).
    if frozen_stages < 0 and name == 'plain':
      g = np.asarray(grads['backbone']['layer1_0']['conv1']['kernel'])
      assert np.abs(g).max() > 0
      g = np.asarray(grads['backbone']['conv1']['kernel'])
      assert np.abs(g).max() > 0


def test_stem_padding_leaves_valid_outputs_unchanged():
  """Zero instead of -inf padding before the stem's max-pool: the valid
  region of C2..C5 equals the same image run alone in a tensor of its own
  padded size (mmdetection's tensor, -inf-padded pool), and the padding
  stays exactly 0."""
  model = backbone_lib.ResNet(depth=50, style='pytorch', base_channels=8,
                              frozen_stages=-1)
  rng = np.random.default_rng(0)
  small = rng.normal(size=(1, 64, 96, 3)).astype(np.float32)
  big = np.zeros((1, 128, 128, 3), np.float32)
  big[:, :64, :96] = small
  variables = model.init(jax.random.key(0), small, np.array([[64, 96]]))
  out_small = model.apply(variables, small, np.array([[64, 96]]))
  out_big = model.apply(variables, big, np.array([[64, 96]]))
  for s, b in zip(out_small, out_big):
    h, w = s.shape[1:3]
    # Float rounding only (XLA tiles the convolutions of the two shapes
    # differently): measured <= 6.4e-7 of the map's largest value.
    np.testing.assert_allclose(np.asarray(b)[:, :h, :w], np.asarray(s),
                               rtol=0, atol=4e-6 * np.abs(s).max())
    assert np.all(np.asarray(b)[:, h:] == 0)
    assert np.all(np.asarray(b)[:, :, w:] == 0)


def test_relu_maxpool_zero_padding_equals_neg_inf_padding():
  """The identity the fix rests on, on numbers: for non-negative inputs a
  3x3/s2 max-pool with zero fill beyond the valid region equals PyTorch's
  -inf-padded pool on the valid tensor, at every valid output."""
  from msrcnn_jax.modeling import layers  # pylint: disable=g-import-not-at-top
  rng = np.random.default_rng(1)
  x = np.maximum(rng.normal(size=(1, 9, 7, 2)), 0).astype(np.float32)
  ref = np.full((1, 5, 4, 2), -np.inf, np.float32)
  xp = np.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)), constant_values=-np.inf)
  for i in range(5):
    for j in range(4):
      ref[0, i, j] = xp[0, 2 * i:2 * i + 3, 2 * j:2 * j + 3].max(axis=(0, 1))
  bucket = np.zeros((1, 16, 16, 2), np.float32)
  bucket[:, :9, :7] = x
  got = np.asarray(layers.max_pool_3x3_s2(jnp.asarray(bucket)))
  np.testing.assert_array_equal(got[:, :5, :4], ref)


def test_nan_padded_images_case_trains_through_train_py(tmp_path):
  """The reported case end to end: train.py on the 3-category COCO dir of
  96x128 images with the quickstart's ``frozen_stages=-1`` trains and logs
  finite gradient norms (before the fix: grad_norm=nan at step 0)."""
  with open(os.path.join(CASE, 'annotations', 'instances_train.json')) as f:
    cats = json.load(f)['categories']
  assert [c['id'] for c in cats] == [1, 2, 3]  # the quickstart's 3 classes
  workdir = tmp_path / 'run'
  cmd = [sys.executable, os.path.join(ROOT, 'train.py'),
         '--config', os.path.join(ROOT, 'configs', 'quickstart_synthetic.py'),
         f'--workdir={workdir}',
         '--config.data.source=coco', f'--config.data.coco_dir={CASE}',
         '--config.data.train_split=train', '--config.data.val_split=val',
         '--config.train.max_steps=2', '--config.train.log_every_steps=1',
         '--config.train.global_batch_size=2',
         '--config.train.eval_every_steps=0', '--config.num_vis_images=0']
  env = dict(os.environ, PYTHONPATH=ROOT)
  proc = subprocess.run(cmd, capture_output=True, text=True, env=env,
                        timeout=600, cwd=ROOT)
  log = proc.stdout + proc.stderr
  assert proc.returncode == 0, log[-3000:]
  assert 'nan' not in log.lower().replace('nan_padded', ''), log[-3000:]
  assert 'grad_norm' in log, log[-3000:]
