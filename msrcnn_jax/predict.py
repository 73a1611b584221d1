r"""Run a converted or trained MS R-CNN on images.

  python -m msrcnn_jax.predict --config configs/ms_rcnn_r50_caffe_fpn_1x_coco.py \
      --checkpoint ckpt/ms_rcnn_r50_caffe_fpn_1x_coco --output results.json \
      [--vis-dir vis/] [--batch-size 2] image1.jpg image2.png ...
  python -m msrcnn_jax.predict --exported exported/r50 --output results.json \
      image1.jpg ...          # programs written by python -m msrcnn_jax.export

Writes a JSON list with one entry per detection: ``image`` (file name),
``label`` (0..79), ``category_id``, ``bbox`` [x, y, w, h] in original pixels,
``score`` (box score), ``mask_iou`` (predicted MaskIoU), ``mask_score``
(score x mask_iou) and ``segmentation`` (COCO RLE at the original size).
"""

from __future__ import annotations

import json
import os
import sys
from typing import Sequence

from absl import app
from absl import flags
from absl import logging
import cv2
from ml_collections import config_flags

from msrcnn_jax import compilation_cache
from msrcnn_jax import config as config_lib
from msrcnn_jax import errors
from msrcnn_jax import postprocess
from msrcnn_jax import serving
from msrcnn_jax.data import image_io
from msrcnn_jax.evaluation import visualize
from msrcnn_jax.inference import Predictor
from msrcnn_jax.modeling import build

_CONFIG = config_flags.DEFINE_config_file(
    'config', None, 'Model config file (configs/<name>.py).')
_CHECKPOINT = flags.DEFINE_string(
    'checkpoint', None,
    'A converted variables directory, a training workdir (its newest '
    'step) or a step directory (<workdir>/checkpoints/<step>).')
_OUTPUT = flags.DEFINE_string('output', 'results.json', 'Output JSON file.')
_VIS_DIR = flags.DEFINE_string(
    'vis-dir', None, 'If set, write a PNG per image with masks, boxes, '
    'class names and both scores.')
_BATCH_SIZE = flags.DEFINE_integer('batch-size', 1, 'Images per batch.',
                                   lower_bound=1)
_EXPORTED = flags.DEFINE_string(
    'exported', None, 'Directory written by python -m msrcnn_jax.export: '
    'run its programs instead of --config/--checkpoint.')
_VIS_THR = flags.DEFINE_float('vis-score-thr', 0.3,
                              'Box score threshold for the pictures.')


def _check_images(paths: Sequence[str]) -> None:
  """Fails before any work on missing files and files whose header no
  OpenCV decoder recognises (images are decoded later, one batch at a
  time)."""
  missing = [p for p in paths if not os.path.isfile(p)]
  if missing:
    raise image_io.ImageReadError(
        f'image file not found: {", ".join(missing)}')
  unknown = [p for p in paths if not cv2.haveImageReader(p)]
  if unknown:
    raise image_io.ImageReadError(
        f'cannot decode image {", ".join(unknown)}: not an image format '
        'OpenCV can read')


def main(argv: Sequence[str]) -> None:
  paths = list(argv[1:])
  if not paths:
    raise app.UsageError('Give at least one image path.')
  if not flags.FLAGS['verbosity'].present:
    logging.set_verbosity(logging.WARNING)  # orbax logs every restore step
  compilation_cache.enable()
  config = _CONFIG.value
  if _EXPORTED.value is None and (config is None or _CHECKPOINT.value is None):
    raise app.UsageError('--config and --checkpoint (or --exported) are '
                         'required.')
  if _EXPORTED.value is None:
    build.validate_config(config)
  _check_images(paths)
  if _EXPORTED.value is not None:
    predictor = serving.ExportedPredictor(_EXPORTED.value)
    config = predictor.config
    batch_size = (_BATCH_SIZE.value if flags.FLAGS['batch-size'].present
                  else predictor.batch_size)
  else:
    variables, meta = build.load_checked_variables(config, _CHECKPOINT.value)
    logging.info('Loaded %s (%s)', _CHECKPOINT.value, meta.get('config_name'))
    predictor = Predictor(config, variables)
    batch_size = _BATCH_SIZE.value
  records = predictor.predict_images(paths, batch_size=batch_size)
  entries = postprocess.records_to_prediction_json(
      records, config.data.category_ids)
  out_dir = os.path.dirname(os.path.abspath(_OUTPUT.value))
  os.makedirs(out_dir, exist_ok=True)
  tmp = _OUTPUT.value + '.tmp'
  with open(tmp, 'w') as f:
    json.dump(entries, f)
  os.replace(tmp, _OUTPUT.value)
  print(f'{len(entries)} detections on {len(paths)} images -> '
        f'{_OUTPUT.value}')
  if _VIS_DIR.value:
    os.makedirs(_VIS_DIR.value, exist_ok=True)
    for path, rec in zip(paths, records):
      rgb = image_io.imread(path)[..., ::-1]
      name = os.path.splitext(os.path.basename(path))[0] + '.png'
      visualize.save_visualization(
          os.path.join(_VIS_DIR.value, name), rgb, rec,
          class_names=config.data.class_names, score_thr=_VIS_THR.value)
    print(f'pictures -> {_VIS_DIR.value}')


if __name__ == '__main__':
  config_lib.exit_on_unknown_overrides(sys.argv)
  errors.run(main)
