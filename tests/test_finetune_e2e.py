"""README "Fine-tune on your own dataset", run end to end as a user runs it.

A released 80-class mmdetection checkpoint (the narrowed r50 caffe fixture,
standing in for a full-size one) is converted with
``convert_torch_weights.py``; a COCO-format directory with 3 categories is
generated; ``train.py`` fine-tunes with a config file written as the README
says (``model.num_classes = 3``, ``data.category_ids``/``class_names``,
``train.init_checkpoint``, ``train.init_skip_patterns =
FINETUNE_SKIP_PATTERNS``); then ``predict`` and ``evaluate`` run on the
training workdir. Asserted:

- the log names each re-initialised class layer with both shapes;
- every frozen parameter (caffe style: stem and layer1, ``frozen_stages=1``)
  of the trained model equals the converted checkpoint's bit for bit, and the
  class layers have the 3-class shapes;
- predict's detections use only the dataset's 3 categories;
- evaluate on the workdir reproduces the metrics the trainer's final
  evaluation wrote (same variables, same data).

Cost: five subprocesses, about 2-3 minutes on the 2-core CPU VM.
"""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from conftest import compilation_cache_env, fixture_path
from msrcnn_jax import variables as variables_lib
from msrcnn_jax.data import synthetic

_TESTS = os.path.dirname(os.path.abspath(__file__))
_ROOT = os.path.dirname(_TESTS)
_CLASS_LAYERS = ('roi_head/bbox_head/fc_cls', 'roi_head/bbox_head/fc_reg',
                 'roi_head/mask_head/conv_logits',
                 'roi_head/mask_iou_head/fc_mask_iou')


def _run(*args, cache_env=None):
  env = dict(os.environ, JAX_PLATFORMS='cpu', PYTHONWARNINGS='ignore',
             **(cache_env or {}))
  proc = subprocess.run([sys.executable, *args], cwd=_ROOT, env=env,
                        capture_output=True, text=True, timeout=900,
                        check=False)
  if proc.returncode != 0:
    pytest.fail(f'{args} exited {proc.returncode}:\n'
                f'{(proc.stdout + proc.stderr)[-4000:]}')
  return proc


def _write(path, text):
  with open(path, 'w') as f:
    f.write(text)
  return str(path)


@pytest.mark.slow
def test_finetune_released_checkpoint_on_three_class_coco_dir(tmp_path):
  cache_env = compilation_cache_env(tmp_path)
  # 1. The released COCO model, converted (its own, 80-class config).
  coco_config = _write(tmp_path / 'coco80.py', (
      f'import sys\nsys.path.insert(0, {_TESTS!r})\nimport conftest\n\n\n'
      'def get_config():\n'
      "  return conftest.fixture_config('r50_caffe_tiny')\n"))
  ckpt = str(tmp_path / 'ckpt')
  _run('convert_torch_weights.py', '--config', coco_config, '--checkpoint',
       fixture_path('r50_caffe_tiny', 'checkpoint.pth'), '--output', ckpt)

  # 2. A COCO-format directory with 3 categories (ids 1, 2, 3).
  data = str(tmp_path / 'mydata')
  synthetic.write_coco(data, 'train', 4, seed=0)
  synthetic.write_coco(data, 'val', 3, seed=1)
  with open(os.path.join(data, 'annotations', 'instances_val.json')) as f:
    val = json.load(f)
  assert [c['id'] for c in val['categories']] == [1, 2, 3]

  # 3. The fine-tuning config, as the README writes it.
  config = _write(tmp_path / 'mydata.py', (
      f'import sys\nsys.path.insert(0, {_TESTS!r})\nimport conftest\n'
      'from msrcnn_jax.config import FINETUNE_SKIP_PATTERNS\n\n\n'
      'def get_config():\n'
      "  c = conftest.fixture_config('r50_caffe_tiny')\n"
      '  c.model.num_classes = 3\n'
      '  c.data.category_ids = (1, 2, 3)\n'
      "  c.data.class_names = ('rectangle', 'ellipse', 'triangle')\n"
      "  c.data.source = 'coco'\n"
      f'  c.data.coco_dir = {data!r}\n'
      "  c.data.train_split, c.data.val_split = 'train', 'val'\n"
      f'  c.train.init_checkpoint = {ckpt!r}\n'
      '  c.train.init_skip_patterns = FINETUNE_SKIP_PATTERNS\n'
      '  c.train.global_batch_size = 2\n'
      '  c.train.max_steps = 2\n'
      '  c.train.log_every_steps = 1\n'
      '  c.num_vis_images = 0\n'
      '  return c\n'))
  workdir = str(tmp_path / 'run')
  proc = _run('train.py', '--config', config, f'--workdir={workdir}',
              cache_env=cache_env)
  log = proc.stdout + proc.stderr
  for layer in _CLASS_LAYERS:
    lines = [l for l in log.splitlines()
             if 're-initialised' in l and f'{layer}/kernel' in l]
    assert lines, (layer, log[-3000:])
  assert 'fc_cls/kernel: checkpoint (64, 81), model (64, 4)' in log

  converted, _ = variables_lib.load_variables(ckpt)
  trained, _ = variables_lib.load_variables(workdir)
  flat_c = variables_lib.flatten(converted)
  flat_t = variables_lib.flatten(trained)
  frozen = [k for k in flat_t if k.startswith(
      ('params/backbone/conv1/', 'params/backbone/bn1/',
       'params/backbone/layer1_'))]
  assert len(frozen) > 20
  for k in frozen:
    np.testing.assert_array_equal(flat_t[k], flat_c[k], err_msg=k)
  # ...and training did change the trainable layers.
  k = 'params/backbone/layer4_0/conv2/kernel'
  assert np.abs(flat_t[k] - flat_c[k]).max() > 0
  assert flat_t['params/roi_head/bbox_head/fc_cls/kernel'].shape == (64, 4)
  assert flat_t['params/roi_head/bbox_head/fc_reg/kernel'].shape == (64, 12)
  assert flat_t['params/roi_head/mask_head/conv_logits/kernel'].shape[-1] == 3
  assert flat_t['params/roi_head/mask_iou_head/fc_mask_iou/kernel'].shape == (
      64, 3)
  with open(os.path.join(workdir, 'eval', 'metrics.json')) as f:
    train_metrics = json.load(f)

  # 4. predict and evaluate on the training workdir.
  images = sorted(os.path.join(data, 'val', im['file_name'])
                  for im in val['images'])
  results = str(tmp_path / 'results.json')
  _run('-m', 'msrcnn_jax.predict', '--config', config, '--checkpoint',
       workdir, '--output', results, *images, cache_env=cache_env)
  with open(results) as f:
    dets = json.load(f)
  assert {d['label'] for d in dets} <= {0, 1, 2}
  assert {d['category_id'] for d in dets} <= {1, 2, 3}
  metrics_path = str(tmp_path / 'metrics.json')
  _run('-m', 'msrcnn_jax.evaluate', '--config', config, '--checkpoint',
       workdir, '--coco-dir', data, '--split', 'val', '--output',
       metrics_path, cache_env=cache_env)
  with open(metrics_path) as f:
    metrics = json.load(f)
  for key in ('bbox_mAP', 'bbox_mAP_50', 'segm_mAP', 'segm_mAP_50'):
    assert metrics[key] == pytest.approx(train_metrics[key], abs=1e-3), key
