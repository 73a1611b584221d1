r"""Run a converted or trained MS R-CNN on images.

  python -m msrcnn_jax.predict --config configs/ms_rcnn_r50_caffe_fpn_1x_coco.py \
      --checkpoint ckpt/ms_rcnn_r50_caffe_fpn_1x_coco --output results.json \
      [--vis-dir vis/] [--batch-size 2] image1.jpg image2.png ...
  python -m msrcnn_jax.predict --exported exported/r50 --output results.json \
      image1.jpg ...          # programs written by python -m msrcnn_jax.export

Writes a JSON list with one entry per detection: ``image`` (the file name;
when two inputs share a file name, e.g. ``d1/x.png d2/x.png``, every image
is named by its path relative to the inputs' common directory, see
``image_names``),
``label`` (0..79), ``category_id``, ``bbox`` [x, y, w, h] in original pixels,
``score`` (box score), ``mask_iou`` (predicted MaskIoU), ``mask_score``
(score x mask_iou) and ``segmentation`` (COCO RLE at the original size).
``--vis-dir`` gets one picture per image, ``<name without extension>.png``
(in subdirectories when names are relative paths; see ``picture_names``).

Refused before any work, with one ``error:`` line: an ``--output`` that is a
directory or whose directory does not exist, a ``--vis-dir`` that is a file,
missing or unrecognised image files.
"""

from __future__ import annotations

import collections
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


def image_names(paths: Sequence[str]) -> list[str]:
  """The names results.json and the pictures give the images.

  The file names, when they are distinct; otherwise every image's path
  relative to the common directory of all of them, with ``/`` separators
  (``d1/x.png``, ``d2/x.png``), so that no two images share a name (a file
  given twice keeps one name: it is the same image).

  Args:
    paths: the image paths as given.

  Returns:
    One name per path, in order.
  """
  base = [os.path.basename(p) for p in paths]
  if len(set(base)) == len(base):
    return base
  absolute = [os.path.abspath(p) for p in paths]
  root = os.path.commonpath([os.path.dirname(p) for p in absolute])
  return [os.path.relpath(p, root).replace(os.sep, '/') for p in absolute]


def picture_names(names: Sequence[str]) -> list[str]:
  """``--vis-dir`` file names for ``image_names``: the name with ``.png``
  for its extension (``d1/x.jpg`` -> ``d1/x.png``), or with ``.png``
  appended where that would give two images one picture (``x.png`` and
  ``x.jpg`` -> ``x.png.png``, ``x.jpg.png``)."""
  stems = [os.path.splitext(n)[0] + '.png' for n in names]
  taken = collections.Counter(stems)
  return [s if taken[s] == 1 or s == n else n + '.png'
          for s, n in zip(stems, names)]


def check_outputs(output: str, vis_dir: str | None) -> None:
  """Refuses output paths that cannot be written, before any work.

  Raises:
    errors.UserError: ``output`` is a directory, or its directory does not
      exist or is not writable; ``vis_dir`` is an existing file.
  """
  if os.path.isdir(output):
    raise errors.UserError(f'--output {output} is a directory; give the '
                           'path of the JSON file to write')
  parent = os.path.dirname(os.path.abspath(output))
  if not os.path.isdir(parent):
    raise errors.UserError(f'--output {output}: directory {parent} does not '
                           'exist')
  if not os.access(parent, os.W_OK | os.X_OK):
    raise errors.UserError(f'--output {output}: directory {parent} is not '
                           'writable')
  if vis_dir and os.path.exists(vis_dir) and not os.path.isdir(vis_dir):
    raise errors.UserError(f'--vis-dir {vis_dir} is a file, not a '
                           'directory')


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
    raise image_io.ImageReadError('cannot decode image ' + '; '.join(
        f'{p}: {image_io.header_problem(p)}' for p in unknown))


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
  check_outputs(_OUTPUT.value, _VIS_DIR.value)
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
  names = image_names(paths)
  for rec, name in zip(records, names):
    rec['file_name'] = name
  entries = postprocess.records_to_prediction_json(
      records, config.data.category_ids)
  tmp = _OUTPUT.value + '.tmp'
  with open(tmp, 'w') as f:
    json.dump(entries, f)
  os.replace(tmp, _OUTPUT.value)
  print(f'{len(entries)} detections on {len(paths)} images -> '
        f'{_OUTPUT.value}')
  if _VIS_DIR.value:
    os.makedirs(_VIS_DIR.value, exist_ok=True)
    for path, rec, picture in zip(paths, records, picture_names(names)):
      rgb = image_io.imread(path)[..., ::-1]
      if 'model' in config and not config_lib.has_mask_iou_head(config):
        # A Mask R-CNN's mask_iou is all 1: no "mIoU" in the captions.
        rec = {k: v for k, v in rec.items() if k != 'mask_iou'}
      visualize.save_visualization(
          os.path.join(_VIS_DIR.value, *picture.split('/')), rgb, rec,
          class_names=config.data.class_names, score_thr=_VIS_THR.value)
    print(f'pictures -> {_VIS_DIR.value}')


if __name__ == '__main__':
  config_lib.exit_on_unknown_overrides(sys.argv)
  errors.run(main)
