"""Quickstart, Mask R-CNN: configs/quickstart_synthetic.py without the MaskIoU head.

  python train.py --config configs/mask_rcnn_quickstart_synthetic.py \
      --workdir workdir/mask_rcnn_quickstart_synthetic

The same narrowed ResNet-50 + FPN, RPN, box and mask heads, data and schedule
as the MS R-CNN quickstart, with mmdetection's StandardRoIHead
(model.roi_head.type): no MaskIoU head, segm results scored by box scores.
It is the starting point of the retrofit (configs/quickstart_synthetic_retrofit.py,
README "Add mask scoring to a Mask R-CNN").
"""

import importlib.util
import os

from msrcnn_jax.config import ms_rcnn_config


def get_config():
  spec = importlib.util.spec_from_file_location(
      'quickstart_synthetic',
      os.path.join(os.path.dirname(os.path.abspath(__file__)),
                   'quickstart_synthetic.py'))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  c = module.get_config()
  c.name = 'mask_rcnn_quickstart_synthetic'
  c.model.roi_head.type = 'StandardRoIHead'
  # The MaskIoU head's keys do not apply: back to the schema's values.
  c.model.roi_head.mask_iou_head = ms_rcnn_config().model.roi_head.mask_iou_head
  return c
