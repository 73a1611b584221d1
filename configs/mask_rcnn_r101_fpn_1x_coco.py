"""mask_rcnn_r101_fpn_1x_coco: Mask R-CNN, ResNet-101 (pytorch style) + FPN, 1x schedule.

mmdetection's released checkpoint reaches box AP 40.0 / mask AP 36.1 on COCO val2017.
Mask R-CNN is mmdetection's MaskRCNN with StandardRoIHead: no MaskIoU head;
mask_score = box score (model.roi_head.type = 'StandardRoIHead').

Convert and evaluate:
  python convert_torch_weights.py --config configs/mask_rcnn_r101_fpn_1x_coco.py \
      --checkpoint mask_rcnn_r101_fpn_1x_coco.pth --output ckpt/mask_rcnn_r101_fpn_1x_coco
  python -m msrcnn_jax.evaluate --config configs/mask_rcnn_r101_fpn_1x_coco.py \
      --checkpoint ckpt/mask_rcnn_r101_fpn_1x_coco --coco-dir /data/coco --output metrics.json
Train (16 images per step, as mmdetection's 8 GPUs x 2):
  python train.py --config configs/mask_rcnn_r101_fpn_1x_coco.py --workdir runs/mask_rcnn_r101_fpn_1x_coco \
      --config.data.coco_dir=/data/coco
"""

from msrcnn_jax.config import mask_rcnn_config


def get_config():
  return mask_rcnn_config(
      name='mask_rcnn_r101_fpn_1x_coco',
      depth=101,
      style='pytorch',
      schedule='1x')
