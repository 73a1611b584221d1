"""``python -m msrcnn_jax.export`` and ``predict --exported`` on the tiny fixture.

The mmdetection fixture checkpoint ``r50_caffe_tiny`` is converted once, then
exported for the bucket both fixture images use (320x512) with a batch of 2.
Checked:

- the exported StableHLO program gives the jitted model's outputs on the
  fixture images (max abs diff <= 1e-5; labels and validity identical); so
  does a bfloat16 export against the jitted bfloat16 model; the TensorFlow
  SavedModel (jax2tf) gives identical labels and validity and floats within
  1e-3 (TensorFlow's own XLA build: measured 6e-4 px on boxes, 3.8e-4 on
  mask logits, 2.2e-5 on MaskIoU);
- ``msrcnn_jax.serving`` imports neither the model code nor Flax;
- ``predict --exported`` writes the results.json that ``predict`` with the
  config and checkpoint writes (its Predictor and JSON conversion, run here);
- an image needing a bucket the export lacks, a batch size it lacks, a missing
  export and a bucket that is not HxW give one ``error:`` line, exit 1.

Cost on the 2-core CPU VM: about 1-2 min (one export, 5 model compilations).
"""

import json
import os
import subprocess
import sys

import cv2
import jax
import numpy as np
import pytest

from conftest import SET_IMAGES, fixture_config, fixture_path
from test_cli import _config_file, _failed, _run

from msrcnn_jax import postprocess
from msrcnn_jax import serving
from msrcnn_jax import variables as variables_lib
from msrcnn_jax.convert import mmdet
from msrcnn_jax.data import image_io
from msrcnn_jax.data import transforms
from msrcnn_jax.inference import Predictor, batch_by_bucket

SET = 'r50_caffe_tiny'
BUCKET = '320x512'
pytestmark = pytest.mark.slow


@pytest.fixture(scope='module')
def exported(tmp_path_factory):
  """(config, jitted Predictor, config file, checkpoint dir, export dir)."""
  d = tmp_path_factory.mktemp('export')
  config = fixture_config(SET)
  variables, _ = mmdet.convert_checkpoint(
      fixture_path(SET, 'checkpoint.pth'), config)
  ckpt = variables_lib.save_variables(str(d / 'ckpt'), variables,
                                      dict(config_name=config.name))
  cfg_file = _config_file(d, SET)
  out = str(d / 'exported')
  proc = _run('-m', 'msrcnn_jax.export', '--config', cfg_file,
              '--checkpoint', ckpt, '--output', out, '--batch-size', '2',
              '--bucket', BUCKET)
  assert f'exported {BUCKET} (batch 2, float32, cpu)' in proc.stdout
  return config, Predictor(config, variables), cfg_file, ckpt, out


def _batch(config):
  items = []
  for i, name in enumerate(SET_IMAGES[SET]):
    item = transforms.preprocess_test(
        image_io.imread(fixture_path(f'{name}.png')), config.data)
    item.update(image_id=i, file_name=f'{name}.png')
    items.append(item)
  batches = list(batch_by_bucket(items, 2, config.data))
  assert len(batches) == 1 and batches[0]['image'].shape[1:3] == (320, 512)
  return batches[0]


def _assert_same_outputs(ours, ref, atol=1e-5):
  """Same keys, shapes and dtypes; integers and booleans equal; floats
  within ``atol``."""
  assert set(ours) == set(ref), (set(ours), set(ref))
  diffs = {}
  for k in ref:
    a, b = np.asarray(ours[k]), np.asarray(ref[k])
    assert a.shape == b.shape and a.dtype == b.dtype, (k, a.dtype, b.dtype)
    if a.dtype.kind in 'biu':
      np.testing.assert_array_equal(a, b, err_msg=k)
    else:
      diffs[k] = float(np.max(np.abs(a.astype(np.float64) - b)))
  assert max(diffs.values()) <= atol, diffs


def test_exported_program_and_saved_model_equal_the_jitted_model(
    exported, tmp_path):
  config, predictor, _, _, out = exported
  variables = predictor.variables
  batch = _batch(config)
  ref = jax.device_get(predictor.detect(batch))
  assert int(ref['valid'].sum()) > 0

  contract = serving.read_contract(out)
  assert contract['batch_size'] == 2 and contract['buckets'] == [[320, 512]]
  assert contract['programs'] == {BUCKET: f'detector_{BUCKET}.stablehlo'}
  assert contract['preprocess']['mean'] == list(config.data.mean)
  assert len(contract['class_names']) == 80
  assert contract['outputs']['boxes']['shape'] == [2, 100, 4]

  _assert_same_outputs(jax.device_get(serving.ExportedPredictor(out).detect(batch)),
                       ref)

  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  loaded = tf.saved_model.load(os.path.join(out, 'saved_model'))
  fn = loaded.signatures[f'detect_{BUCKET}']
  tf_out = fn(**{k: tf.constant(batch[k]) for k in
                 ('image', 'img_shape', 'pad_shape', 'scale_factor')})
  # TensorFlow compiles the same StableHLO with its own XLA build, whose
  # float32 results differ slightly (measured: boxes 6.0e-4 px, mask logits
  # 3.8e-4, MaskIoU 2.2e-5); detections, labels and validity are identical.
  _assert_same_outputs({k: v.numpy() for k, v in tf_out.items()}, ref,
                       atol=1e-3)

  # bfloat16 compute: the export equals the jitted bf16 model.
  from msrcnn_jax import export  # pylint: disable=g-import-not-at-top
  bf16 = str(tmp_path / 'bf16')
  export.export_detector(config, variables, bf16, batch_size=2,
                         buckets=[(320, 512)], dtype='bfloat16',
                         saved_model=False)
  ref16 = jax.device_get(
      Predictor(config, variables, dtype='bfloat16').detect(batch))
  _assert_same_outputs(
      jax.device_get(serving.ExportedPredictor(bf16).detect(batch)),
                       ref16)


def test_serving_needs_no_model_code():
  code = ('import sys; import msrcnn_jax.serving; '
          'bad = [m for m in sys.modules if m.startswith('
          '("msrcnn_jax.modeling", "flax"))]; print(bad); '
          'sys.exit(1 if bad else 0)')
  proc = subprocess.run([sys.executable, '-c', code], capture_output=True,
                        text=True, cwd=os.path.dirname(os.path.dirname(
                            os.path.abspath(__file__))), check=False)
  assert proc.returncode == 0, proc.stdout + proc.stderr[-2000:]


def test_predict_exported_reproduces_predict(exported, tmp_path):
  config, predictor, cfg_file, ckpt, out = exported
  images = [fixture_path(f'{n}.png') for n in SET_IMAGES[SET]]
  # What predict --config --checkpoint --batch-size 2 writes (its code path,
  # in this process: the jitted model is compiled once for the module).
  ref = json.loads(json.dumps(postprocess.records_to_prediction_json(
      predictor.predict_images(images, 2, progress=False),
      config.data.category_ids)))
  ours_json = tmp_path / 'ours.json'
  proc = _run('-m', 'msrcnn_jax.predict', '--exported', out, '--output',
              str(ours_json), *images)
  assert f'{len(ref)} detections on 2 images' in proc.stdout
  assert len(ref) > 0
  assert json.loads(ours_json.read_text()) == ref

  def predict_exported(*args):
    return _run('-m', 'msrcnn_jax.predict', '--output',
                str(tmp_path / 'x.json'), *args, expect_ok=False)

  # A portrait image is padded to 512x320, which fits no exported bucket.
  portrait = str(tmp_path / 'portrait.png')
  cv2.imwrite(portrait, cv2.imread(images[0]).transpose(1, 0, 2))
  proc = predict_exported('--exported', out, portrait)
  _failed(proc, 'error:', out, 'lacks a bucket', '(512, 320)')
  proc = predict_exported('--exported', out, '--batch-size', '3', *images)
  _failed(proc, 'error:', 'batches of 2 images', '--batch-size 3')
  missing = str(tmp_path / 'nowhere')
  _failed(predict_exported('--exported', missing, *images), 'error:',
          missing, 'not found')
  assert not (tmp_path / 'x.json').exists()
  proc = _run('-m', 'msrcnn_jax.export', '--config', cfg_file, '--checkpoint',
              ckpt, '--output', str(tmp_path / 'e'), '--bucket', '300x500',
              expect_ok=False)
  _failed(proc, 'error: --bucket 300x500', 'multiples of 32')
  assert proc.stderr.count('\n') <= 2, proc.stderr
