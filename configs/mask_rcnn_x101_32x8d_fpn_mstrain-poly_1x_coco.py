"""mask_rcnn_x101_32x8d_fpn_mstrain-poly_1x_coco: Mask R-CNN, ResNeXt-101 32x8d (pytorch style) + FPN, 1x schedule.

mmdetection's released checkpoint reaches box AP 43.4 / mask AP 39.0 on COCO val2017.
Mask R-CNN is mmdetection's MaskRCNN with StandardRoIHead: no MaskIoU head;
mask_score = box score (model.roi_head.type = 'StandardRoIHead').

Multi-scale training: the short side of each training image is drawn from
(640, 672, 704, 736, 768, 800), long side <= 1333 (mmdetection's
Resize(multiscale_mode='value')); testing at 1333x800.

'poly': mmdetection keeps the COCO polygons (poly2mask=False) and rasterises
them per RoI for the mask targets; here the targets come from the decoded
bitmaps (poly2mask=True path), a sub-pixel difference on mask boundaries in
training only (inference and conversion are unaffected).

The detectron2 ImageNet ResNeXt-101 32x8d it starts from takes BGR input with
mean (103.530, 116.280, 123.675) and std (57.375, 57.120, 58.395), and its BN
layers stay frozen (norm_cfg requires_grad=False).

Convert and evaluate:
  python convert_torch_weights.py --config configs/mask_rcnn_x101_32x8d_fpn_mstrain-poly_1x_coco.py \
      --checkpoint mask_rcnn_x101_32x8d_fpn_mstrain-poly_1x_coco.pth --output ckpt/mask_rcnn_x101_32x8d_fpn_mstrain-poly_1x_coco
  python -m msrcnn_jax.evaluate --config configs/mask_rcnn_x101_32x8d_fpn_mstrain-poly_1x_coco.py \
      --checkpoint ckpt/mask_rcnn_x101_32x8d_fpn_mstrain-poly_1x_coco --coco-dir /data/coco --output metrics.json
Train (16 images per step, as mmdetection's 8 GPUs x 2):
  python train.py --config configs/mask_rcnn_x101_32x8d_fpn_mstrain-poly_1x_coco.py --workdir runs/mask_rcnn_x101_32x8d_fpn_mstrain-poly_1x_coco \
      --config.data.coco_dir=/data/coco
"""

from msrcnn_jax.config import mask_rcnn_config


def get_config():
  c = mask_rcnn_config(
      name='mask_rcnn_x101_32x8d_fpn_mstrain-poly_1x_coco',
      depth=101,
      style='pytorch',
      groups=32,
      base_width=8,
      schedule='1x',
      multiscale='value')
  c.model.backbone.bn_trainable = False  # norm_cfg requires_grad=False
  c.data.mean = (103.530, 116.280, 123.675)
  c.data.std = (57.375, 57.120, 58.395)
  c.data.to_rgb = False
  return c
