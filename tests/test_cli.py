"""The command-line tools end to end, run as a user runs them (subprocesses).

- ``convert_torch_weights.py`` then ``python -m msrcnn_jax.predict`` on the
  fixture PNGs, for the r50 caffe set (torch zip checkpoint) and the x101 set
  (legacy torch format): ``results.json`` has the documented keys and matches
  mmdetection's ``results.json`` (same count per image; each mmdetection
  detection matched with the same label, box IoU >= 0.999, |d score| and
  |d mask_score| within the set's measured float32 bound,
  ``conftest.PARITY_TOL``), ``mask_score == score * mask_iou``, one picture
  per image in ``--vis-dir``.
- ``python -m msrcnn_jax.evaluate`` on a synthetic COCO directory (3
  categories; the random-weight COCO-80 model's labels >= 3 are dropped):
  the 12 mmdetection metric keys, results files and the mask-scoring report.
- Error paths exit non-zero with a message naming the file or key (a long
  list of keys in the file the error line names): a checkpoint converted
  with the wrong config, a truncated and a corrupt .pth,
  a missing checkpoint directory, a checkpoint of another config, a text
  file named .png, a truncated PNG and a missing image.

The fixture models are given to the tools as config files written to
``tmp_path`` that return ``conftest.fixture_config(set)``.
"""

import collections
import json
import os
import subprocess
import sys

import cv2
import numpy as np
import pytest

from conftest import PARITY_TOL, SET_IMAGES, fixture_path, load_results

_TESTS = os.path.dirname(os.path.abspath(__file__))
_ROOT = os.path.dirname(_TESTS)
_DOC_KEYS = {'image', 'label', 'category_id', 'bbox', 'score', 'mask_iou',
             'mask_score', 'segmentation'}
_METRIC_KEYS = [f'{m}_{k}' for m in ('bbox', 'segm') for k in (
    'mAP', 'mAP_50', 'mAP_75', 'mAP_s', 'mAP_m', 'mAP_l')]


def _run(*args, expect_ok=True):
  """Runs ``python args...`` in the repository root; returns the process."""
  env = dict(os.environ, JAX_PLATFORMS='cpu', PYTHONWARNINGS='ignore')
  proc = subprocess.run([sys.executable, *args], cwd=_ROOT, env=env,
                        capture_output=True, text=True, timeout=600,
                        check=False)
  if expect_ok and proc.returncode != 0:
    pytest.fail(f'{args} exited {proc.returncode}:\n{proc.stderr[-3000:]}')
  return proc


def _config_file(directory, set_name):
  """A config file whose ``get_config()`` is the fixture set's config."""
  path = os.path.join(str(directory), f'{set_name}_config.py')
  with open(path, 'w') as f:
    f.write(f'import sys\nsys.path.insert(0, {_TESTS!r})\n'
            'import conftest\n\n\ndef get_config():\n'
            f'  return conftest.fixture_config({set_name!r})\n')
  return path


@pytest.fixture(scope='module')
def converted(tmp_path_factory):
  """set name -> (config file, converted checkpoint dir), converted once."""
  cache = {}

  def get(set_name):
    if set_name not in cache:
      d = tmp_path_factory.mktemp(set_name)
      cfg = _config_file(d, set_name)
      out = os.path.join(str(d), 'ckpt')
      proc = _run('convert_torch_weights.py', '--config', cfg,
                  '--checkpoint', fixture_path(set_name, 'checkpoint.pth'),
                  '--output', out)
      assert 'missing: 0' in proc.stdout and 'mis-shaped: 0' in proc.stdout
      cache[set_name] = (cfg, out)
    return cache[set_name]
  return get


def _xyxy(bbox):
  x, y, w, h = bbox
  return np.array([x, y, x + w, y + h], np.float64)


def _box_iou(a, b):
  lt, rb = np.maximum(a[:2], b[:2]), np.minimum(a[2:], b[2:])
  inter = np.prod(np.clip(rb - lt, 0, None))
  area = lambda x: (x[2] - x[0]) * (x[3] - x[1])
  return inter / (area(a) + area(b) - inter)


@pytest.mark.slow
@pytest.mark.parametrize('set_name', ['r50_caffe_tiny', 'x101_pytorch_tiny'])
def test_convert_then_predict_matches_mmdetection(set_name, converted,
                                                  tmp_path):
  cfg, ckpt = converted(set_name)
  images = [fixture_path(f'{n}.png') for n in SET_IMAGES[set_name]]
  out = tmp_path / 'results.json'
  vis = tmp_path / 'vis'
  proc = _run('-m', 'msrcnn_jax.predict', '--config', cfg, '--checkpoint',
              ckpt, '--output', str(out), '--vis-dir', str(vis),
              '--batch-size', '2', *images)
  ours = json.loads(out.read_text())
  ref = load_results(set_name)
  assert f'{len(ours)} detections on 2 images' in proc.stdout

  for e in ours:
    assert set(e) == _DOC_KEYS
    assert set(e['segmentation']) == {'size', 'counts'}
    assert isinstance(e['segmentation']['counts'], str)
    assert 0 <= e['label'] < 80
    np.testing.assert_allclose(e['mask_score'], e['score'] * e['mask_iou'],
                               rtol=1e-5, atol=1e-7)
  count = lambda es: collections.Counter(e['image'] for e in es)
  assert count(ours) == count(ref)
  sizes = {os.path.basename(p): list(cv2.imread(p).shape[:2]) for p in images}
  for e in ours:
    assert e['segmentation']['size'] == sizes[e['image']]

  unmatched = []
  tol = PARITY_TOL[set_name]
  for r in ref:
    if not any(o['image'] == r['image'] and o['label'] == r['label']
               and o['category_id'] == r['category_id']
               and _box_iou(_xyxy(o['bbox']), _xyxy(r['bbox'])) >= 0.999
               and abs(o['score'] - r['score']) <= tol['score']
               and abs(o['mask_score'] - r['mask_score']) <= tol['mask_score']
               for o in ours):
      unmatched.append(r)
  assert not unmatched, f'{len(unmatched)} of {len(ref)} unmatched: ' \
      f'{unmatched[:3]}'

  pictures = sorted(os.listdir(vis))
  assert pictures == sorted(f'{n}.png' for n in SET_IMAGES[set_name])
  for name in pictures:
    assert cv2.imread(str(vis / name)) is not None


@pytest.mark.slow
def test_evaluate_on_synthetic_coco(converted, tmp_path):
  from msrcnn_jax.data import synthetic  # pylint: disable=g-import-not-at-top
  cfg, ckpt = converted('r50_caffe_tiny')
  coco_dir = tmp_path / 'coco'
  synthetic.write_coco(str(coco_dir), 'val2017', n=4)
  out = tmp_path / 'eval' / 'metrics.json'
  proc = _run('-m', 'msrcnn_jax.evaluate', '--config', cfg, '--checkpoint',
              ckpt, '--coco-dir', str(coco_dir), '--output', str(out),
              '--max-images', '3')
  metrics = json.loads(out.read_text())
  for k in _METRIC_KEYS:
    assert isinstance(metrics[k], float), k
    assert -1.0 <= metrics[k] <= 1.0, k
  assert metrics['num_images'] == 3
  assert 'mask_scoring' in metrics
  printed = json.loads(proc.stdout.strip().splitlines()[-1])
  assert set(printed) == set(_METRIC_KEYS)
  # The COCO-80 model's labels >= 3 name no synthetic category: dropped.
  assert 'not evaluated' in proc.stderr
  d = out.parent
  for name in ('results.bbox.json', 'results.segm.json',
               'mask_scoring_report.json'):
    assert (d / name).is_file(), name
  assert any(n.endswith('.png') for n in os.listdir(d))
  synthetic_cats = {1, 2, 3}
  for name in ('results.bbox.json', 'results.segm.json'):
    res = json.loads((d / name).read_text())
    assert {r['category_id'] for r in res} <= synthetic_cats
    assert {r['image_id'] for r in res} <= {0, 1, 2, 3}


def _failed(proc, *needles):
  """Asserts a non-zero exit whose stderr names every one of ``needles``."""
  assert proc.returncode != 0, proc.stdout[-2000:]
  for n in needles:
    assert n in proc.stderr, f'{n!r} not in stderr:\n{proc.stderr[-3000:]}'


def test_convert_errors(tmp_path):
  cfg_x101 = _config_file(tmp_path, 'x101_pytorch_tiny')
  cfg_r50 = _config_file(tmp_path, 'r50_caffe_tiny')
  pth = fixture_path('r50_caffe_tiny', 'checkpoint.pth')
  out = str(tmp_path / 'out')

  def convert(cfg, checkpoint):
    return _run('convert_torch_weights.py', '--config', cfg, '--checkpoint',
                checkpoint, '--output', out, expect_ok=False)

  # The r50 caffe checkpoint with the x101 config: names mis-shaped keys
  # (all of them in the file the error line names).
  proc = convert(cfg_x101, pth)
  _failed(proc, 'error: checkpoint does not match', 'mis-shaped: ')
  with open(proc.stderr.strip().splitlines()[-1].rsplit(
      '(full list: ', 1)[1].rstrip(')')) as f:
    assert 'backbone.layer1.0.conv2.weight' in f.read()
  truncated = tmp_path / 'truncated.pth'
  with open(pth, 'rb') as f:
    content = f.read()
  truncated.write_bytes(content[:len(content) // 2])
  _failed(convert(cfg_r50, str(truncated)), str(truncated), 'truncated')
  corrupt = tmp_path / 'corrupt.pth'
  corrupt.write_text('this is not a checkpoint\n')
  _failed(convert(cfg_r50, str(corrupt)), str(corrupt), 'corrupt')
  _failed(convert(cfg_r50, str(tmp_path / 'nope.pth')), 'nope.pth',
          'not found')
  assert not os.path.exists(out)


@pytest.mark.slow
def test_predict_errors(converted, tmp_path):
  cfg_r50, ckpt_r50 = converted('r50_caffe_tiny')
  _, ckpt_x101 = converted('x101_pytorch_tiny')
  image = fixture_path('chelsea.png')
  out = tmp_path / 'results.json'

  def predict(ckpt, *images):
    return _run('-m', 'msrcnn_jax.predict', '--config', cfg_r50,
                '--checkpoint', ckpt, '--output', str(out), *images,
                expect_ok=False)

  missing_dir = str(tmp_path / 'no_such_ckpt')
  _failed(predict(missing_dir, image), missing_dir, 'not found')
  # A checkpoint converted for the x101 config, run with the r50 one.
  # The long list of mis-shaped variables is shortened on the console; the
  # error line names the file with all of them.
  proc = predict(ckpt_x101, image)
  _failed(proc, ckpt_x101, 'does not fit config', 'mis-shaped variables',
          "written for config 'ms_rcnn_x101_32x4d_fpn_1x_coco'")
  last = proc.stderr.strip().splitlines()[-1]
  if '(full list: ' in last:
    with open(last.rsplit('(full list: ', 1)[1].rstrip(')')) as f:
      assert 'params/backbone/layer4_2/conv2/kernel' in f.read()
  else:
    assert 'params/backbone/layer4_2/conv2/kernel' in proc.stderr
  not_png = tmp_path / 'x.png'
  not_png.write_text('not an image\n')
  _failed(predict(ckpt_r50, image, str(not_png)), str(not_png),
          'cannot decode image')
  # A PNG header with half the data: found only when it is decoded.
  truncated = tmp_path / 'truncated.png'
  with open(image, 'rb') as f:
    truncated.write_bytes(f.read()[:20000])
  _failed(predict(ckpt_r50, str(truncated), image), str(truncated),
          'cannot decode image')
  missing = str(tmp_path / 'missing.png')
  _failed(predict(ckpt_r50, image, missing), missing, 'not found')
  assert not out.exists()
