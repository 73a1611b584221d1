"""mask_rcnn_r50_fpn_2x_coco: Mask R-CNN, ResNet-50 (pytorch style) + FPN, 2x schedule.

mmdetection's released checkpoint reaches box AP 39.2 / mask AP 35.4 on COCO val2017.
Mask R-CNN is mmdetection's MaskRCNN with StandardRoIHead: no MaskIoU head;
mask_score = box score (model.roi_head.type = 'StandardRoIHead').

Convert and evaluate:
  python convert_torch_weights.py --config configs/mask_rcnn_r50_fpn_2x_coco.py \
      --checkpoint mask_rcnn_r50_fpn_2x_coco.pth --output ckpt/mask_rcnn_r50_fpn_2x_coco
  python -m msrcnn_jax.evaluate --config configs/mask_rcnn_r50_fpn_2x_coco.py \
      --checkpoint ckpt/mask_rcnn_r50_fpn_2x_coco --coco-dir /data/coco --output metrics.json
Train (16 images per step, as mmdetection's 8 GPUs x 2):
  python train.py --config configs/mask_rcnn_r50_fpn_2x_coco.py --workdir runs/mask_rcnn_r50_fpn_2x_coco \
      --config.data.coco_dir=/data/coco
"""

from msrcnn_jax.config import mask_rcnn_config


def get_config():
  return mask_rcnn_config(
      name='mask_rcnn_r50_fpn_2x_coco',
      depth=50,
      style='pytorch',
      schedule='2x')
