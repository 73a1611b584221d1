"""Converts an mmdetection 2.x MS R-CNN or Mask R-CNN checkpoint (.pth) into
Flax variables (a Mask R-CNN needs a ``mask_rcnn_*`` config: its
``model.roi_head.type`` is ``'StandardRoIHead'``; the wrong family is named).

  python convert_torch_weights.py \
      --config configs/ms_rcnn_r50_caffe_fpn_1x_coco.py \
      --checkpoint ms_rcnn_r50_caffe_fpn_1x_coco.pth \
      --output ckpt/ms_rcnn_r50_caffe_fpn_1x_coco

``--backbone-only`` converts an ImageNet backbone (torchvision / mmcv
ResNet/ResNeXt keys or open-mmlab://detectron2 caffe keys: ``conv1.weight``,
``bn1.*``, ``layerX.Y.*``; ``fc.*`` ignored) into the ``backbone`` subtree, as
the training init checkpoint. Conversion is strict: it prints what it mapped
and exits non-zero naming every missing, unexpected or mis-shaped tensor.
"""

import os
import sys

from absl import app
from absl import flags
from absl import logging
from ml_collections import config_flags

from msrcnn_jax import config as config_lib
from msrcnn_jax import errors
from msrcnn_jax import variables as variables_lib
from msrcnn_jax.convert import mmdet
from msrcnn_jax.modeling import build

_CONFIG = config_flags.DEFINE_config_file(
    'config', None, 'configs/*.py file of the model.', lock_config=True)
_CHECKPOINT = flags.DEFINE_string('checkpoint', None, 'mmdetection .pth file.')
_OUTPUT = flags.DEFINE_string('output', None, 'Output checkpoint directory.')
_BACKBONE_ONLY = flags.DEFINE_bool(
    'backbone-only', False, 'Convert an ImageNet backbone only.')


def main(argv):
  del argv
  if not flags.FLAGS['verbosity'].present:
    logging.set_verbosity(logging.WARNING)  # orbax logs every save step
  config = _CONFIG.value
  if config is None or not _CHECKPOINT.value or not _OUTPUT.value:
    raise app.UsageError('--config, --checkpoint and --output are required')
  build.validate_config(config)
  variables, report = mmdet.convert_checkpoint(
      _CHECKPOINT.value, config, backbone_only=_BACKBONE_ONLY.value)
  print(report.format())
  out = variables_lib.save_variables(
      _OUTPUT.value, variables,
      dict(config_name=config.name, source=os.path.abspath(_CHECKPOINT.value),
           backbone_only=_BACKBONE_ONLY.value,
           tensors_mapped=len(report.mapped), num_params=report.num_params))
  print(f'wrote {out}')


if __name__ == '__main__':
  config_lib.exit_on_unknown_overrides(sys.argv)
  flags.mark_flags_as_required(['config', 'checkpoint', 'output'])
  errors.run(main)
