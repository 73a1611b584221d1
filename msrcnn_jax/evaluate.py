r"""COCO evaluation of a converted or trained checkpoint.

  python -m msrcnn_jax.evaluate --config configs/ms_rcnn_r50_caffe_fpn_1x_coco.py \
      --checkpoint ckpt/ms_rcnn_r50_caffe_fpn_1x_coco --coco-dir /data/coco \
      [--split val2017] [--max-images N] [--batch-size 1] --output metrics.json

Runs inference over the split (progress bar), writes the COCO results files
(bbox entries scored by the box score, segm entries by the mask score, as
mmdetection 2.x does) and ``metrics.json`` with mmdetection's key names
(``bbox_mAP``, ``bbox_mAP_50``, ..., ``segm_mAP_l``), prints pycocotools'
table, and writes the mask-scoring report (``mask_scoring_report.json`` and
a scatter PNG) beside ``metrics.json``.
"""

from __future__ import annotations

import json
import os
import sys
from typing import Sequence

from absl import app
from absl import flags
from absl import logging
from ml_collections import config_flags

from msrcnn_jax import compilation_cache
from msrcnn_jax import config as config_lib
from msrcnn_jax import errors
from msrcnn_jax.data import pipeline
from msrcnn_jax.evaluation.coco_evaluator import write_json
from msrcnn_jax.evaluation.run import evaluate_model
from msrcnn_jax.modeling import build

_CONFIG = config_flags.DEFINE_config_file(
    'config', None, 'Model config file (configs/<name>.py).')
_CHECKPOINT = flags.DEFINE_string(
    'checkpoint', None,
    'A converted variables directory, a training workdir (its newest '
    'step) or a step directory (<workdir>/checkpoints/<step>).')
_COCO_DIR = flags.DEFINE_string('coco-dir', None, 'Local COCO directory.')
_SPLIT = flags.DEFINE_string('split', 'val2017', 'Split to evaluate.')
_MAX_IMAGES = flags.DEFINE_integer('max-images', 0, '0 = the whole split.',
                                   lower_bound=0)
_BATCH_SIZE = flags.DEFINE_integer('batch-size', 1, 'Images per batch.',
                                   lower_bound=1)
_OUTPUT = flags.DEFINE_string('output', 'metrics.json', 'Metrics JSON path.')


def main(argv: Sequence[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {" ".join(argv[1:])}')
  if not flags.FLAGS['verbosity'].present:
    logging.set_verbosity(logging.WARNING)  # orbax logs every restore step
  compilation_cache.enable()
  config = _CONFIG.value
  if config is None or not _CHECKPOINT.value or not _COCO_DIR.value:
    raise app.UsageError('--config, --checkpoint and --coco-dir are required.')
  with config.unlocked():
    config.data.source = 'coco'
    config.data.coco_dir = _COCO_DIR.value
    config.data.val_split = _SPLIT.value
  output_dir = os.path.dirname(os.path.abspath(_OUTPUT.value))
  build.validate_config(config)
  source = pipeline.build_source(config, train=False)
  variables, _ = build.load_checked_variables(config, _CHECKPOINT.value)
  os.makedirs(output_dir, exist_ok=True)
  metrics, _ = evaluate_model(config, variables, output_dir, source=source,
                              max_images=_MAX_IMAGES.value,
                              batch_size=_BATCH_SIZE.value)
  if os.path.abspath(_OUTPUT.value) != os.path.join(output_dir,
                                                    'metrics.json'):
    write_json(_OUTPUT.value, metrics)
  print(json.dumps({k: v for k, v in metrics.items()
                    if k.endswith(('mAP', '_50', '_75', '_s', '_m', '_l'))}))


if __name__ == '__main__':
  config_lib.exit_on_unknown_overrides(sys.argv)
  errors.run(main)
