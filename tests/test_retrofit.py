"""Mask R-CNN trained, evaluated, then retrofitted with a MaskIoU head trained
alone (issue 16, items 1 and 4), as the README's "Add mask scoring to a Mask
R-CNN" runs it, shortened: ``train.py`` subprocesses on synthetic data.

1. ``configs/mask_rcnn_quickstart_synthetic.py`` (StandardRoIHead) trains 2
   steps: no ``loss_mask_iou``, no ``mask_iou_head`` parameters, and the
   final evaluation's mask-scoring report says "no MaskIoU head".
2. ``configs/quickstart_synthetic_retrofit.py`` (the same network plus a
   MaskIoU head, ``train.init_checkpoint`` = step 1's ``final``,
   ``train.trainable_patterns = ('^params/roi_head/mask_iou_head/',)``)
   trains 3 steps: every parameter and BN statistic but the MaskIoU head's is
   bit-identical to the Mask R-CNN's, the MaskIoU head moved away from its
   initialisation, and the final evaluation has MaskIoU correlations.
   Its segm results are scored by box score x MaskIoU (not the box score).
Also in-process: the optimizer state of the retrofit holds only the head's
parameters, and a pattern that matches nothing is refused naming the key.
Cost: two train.py subprocesses (each compiles a train step and the
predictor), about 2-3 minutes on the quiet 2-core CPU VM.
"""

import json
import os
import re
import subprocess
import sys

import jax
import numpy as np
import pytest

from msrcnn_jax import config as config_lib
from msrcnn_jax import variables as variables_lib
from msrcnn_jax.errors import ConfigError
from msrcnn_jax.modeling import build
from msrcnn_jax.training import optimizer as optimizer_lib

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_SMALL = ('--config.data.synthetic.num_train=8',
          '--config.data.synthetic.num_val=2',
          '--config.data.synthetic.cache=False',
          '--config.data.num_workers=0',
          '--config.train.global_batch_size=2',
          '--config.train.log_every_steps=1',
          '--config.train.warmup_steps=1',
          '--config.num_vis_images=0')


def _run(*args):
  env = dict(os.environ, JAX_PLATFORMS='cpu', PYTHONWARNINGS='ignore')
  proc = subprocess.run([sys.executable, *args], cwd=_ROOT, env=env,
                        capture_output=True, text=True, timeout=900,
                        check=False)
  out = proc.stdout + proc.stderr
  if proc.returncode != 0:
    pytest.fail(f'{args} exited {proc.returncode}:\n{out[-4000:]}')
  return out


def _config(name):
  import importlib.util  # pylint: disable=g-import-not-at-top
  spec = importlib.util.spec_from_file_location(
      name, os.path.join(_ROOT, 'configs', f'{name}.py'))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config()


def test_retrofit_optimizer_state_and_pattern_errors():
  cfg = _config('quickstart_synthetic_retrofit')
  params = build.variable_shapes(cfg)['params']
  mask = optimizer_lib.trainable_mask_from_config(params, cfg)
  flat = variables_lib.flatten({'params': mask})
  trained = sorted(k for k, m in flat.items() if m)
  assert trained and all(
      k.startswith('params/roi_head/mask_iou_head/') for k in trained)
  assert len(trained) == sum('/mask_iou_head/' in k for k in flat)
  tx, _ = optimizer_lib.make_optimizer(cfg, mask)
  state = jax.eval_shape(tx.init, params)
  head = sum(int(np.prod(x.shape)) for k, x in variables_lib.flatten(
      {'params': params}).items() if '/mask_iou_head/' in k)
  sizes = [int(np.prod(x.shape)) for x in jax.tree.leaves(state)
           if hasattr(x, 'shape') and x.ndim]
  # AdamW: first and second moments of the head's parameters, nothing else.
  assert sum(sizes) == 2 * head, (sum(sizes), head)
  cfg.train.trainable_patterns = ('^params/roi_head/maskiou_head/',)
  with pytest.raises(ConfigError, match='train.trainable_patterns'):
    optimizer_lib.trainable_mask_from_config(params, cfg)
  cfg.train.trainable_patterns = ('mask_iou_head(',)
  with pytest.raises(ConfigError, match='not a regular expression'):
    config_lib.validate(cfg)


@pytest.mark.slow
def test_mask_rcnn_then_retrofit_end_to_end(tmp_path):
  base = str(tmp_path / 'mask_rcnn')
  out = _run('train.py', '--config', 'configs/mask_rcnn_quickstart_synthetic.py',
             f'--workdir={base}', '--config.train.max_steps=2', *_SMALL)
  assert 'loss_mask=' in out and 'loss_mask_iou' not in out, out[-3000:]
  with open(os.path.join(base, 'eval', 'metrics.json')) as f:
    metrics = json.load(f)
  assert 'no MaskIoU head' in metrics['mask_scoring']['note']
  mask_rcnn, _ = variables_lib.load_variables(os.path.join(base, 'final'))
  flat_m = variables_lib.flatten(mask_rcnn)
  assert not any('mask_iou_head' in k for k in flat_m)

  retro = str(tmp_path / 'retrofit')
  out = _run('train.py', '--config', 'configs/quickstart_synthetic_retrofit.py',
             f'--workdir={retro}', '--config.train.max_steps=3',
             '--config.train.checkpoint_every_steps=1',
             f'--config.train.init_checkpoint={base}/final', *_SMALL)
  assert re.search(r'loss_mask_iou=', out), out[-3000:]
  trained, _ = variables_lib.load_variables(os.path.join(retro, 'final'))
  flat_t = variables_lib.flatten(trained)
  head = [k for k in flat_t if '/mask_iou_head/' in k]
  assert head and set(flat_t) - set(head) == set(flat_m)
  for k, v in flat_m.items():   # everything but the head: the same bits
    np.testing.assert_array_equal(
        np.asarray(flat_t[k]).view(np.uint32), np.asarray(v).view(np.uint32),
        err_msg=k)
  # The head trains: it moved between the checkpoints of steps 1 and 3.
  step1, _ = variables_lib.load_variables(
      os.path.join(retro, 'checkpoints', '1'))
  flat_1 = variables_lib.flatten(step1)
  assert [k for k in head if not np.array_equal(flat_t[k], flat_1[k])], (
      'the MaskIoU head did not train')
  with open(os.path.join(retro, 'eval', 'metrics.json')) as f:
    metrics = json.load(f)
  assert 'note' not in metrics['mask_scoring']
  assert 'pearson_maskiou' in metrics['mask_scoring']

  # The predictions carry mask scores: segm results are scored by
  # box score x MaskIoU, not by the box score.
  def scores(kind):
    with open(os.path.join(retro, 'eval', f'results.{kind}.json')) as f:
      return np.array([e['score'] for e in json.load(f)])
  box, segm = scores('bbox'), scores('segm')
  assert len(box) == len(segm) > 0
  assert np.abs(box - segm).max() > 1e-3
