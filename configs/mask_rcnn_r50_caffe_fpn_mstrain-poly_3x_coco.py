"""mask_rcnn_r50_caffe_fpn_mstrain-poly_3x_coco: Mask R-CNN, ResNet-50 (caffe style) + FPN, 3x schedule.

mmdetection's released checkpoint reaches box AP 40.8 / mask AP 37.0 on COCO val2017.
Mask R-CNN is mmdetection's MaskRCNN with StandardRoIHead: no MaskIoU head;
mask_score = box score (model.roi_head.type = 'StandardRoIHead').

Multi-scale training: the short side of each training image is drawn from
(640, 672, 704, 736, 768, 800), long side <= 1333 (mmdetection's
Resize(multiscale_mode='value')); testing at 1333x800.

'poly': mmdetection keeps the COCO polygons (poly2mask=False) and rasterises
them per RoI for the mask targets; here the targets come from the decoded
bitmaps (poly2mask=True path), a sub-pixel difference on mask boundaries in
training only (inference and conversion are unaffected).

Convert and evaluate:
  python convert_torch_weights.py --config configs/mask_rcnn_r50_caffe_fpn_mstrain-poly_3x_coco.py \
      --checkpoint mask_rcnn_r50_caffe_fpn_mstrain-poly_3x_coco.pth --output ckpt/mask_rcnn_r50_caffe_fpn_mstrain-poly_3x_coco
  python -m msrcnn_jax.evaluate --config configs/mask_rcnn_r50_caffe_fpn_mstrain-poly_3x_coco.py \
      --checkpoint ckpt/mask_rcnn_r50_caffe_fpn_mstrain-poly_3x_coco --coco-dir /data/coco --output metrics.json
Train (16 images per step, as mmdetection's 8 GPUs x 2):
  python train.py --config configs/mask_rcnn_r50_caffe_fpn_mstrain-poly_3x_coco.py --workdir runs/mask_rcnn_r50_caffe_fpn_mstrain-poly_3x_coco \
      --config.data.coco_dir=/data/coco
"""

from msrcnn_jax.config import mask_rcnn_config


def get_config():
  c = mask_rcnn_config(
      name='mask_rcnn_r50_caffe_fpn_mstrain-poly_3x_coco',
      depth=50,
      style='caffe',
      schedule='3x',
      multiscale='value')
  c.train.lr_steps_epochs = [28, 34]
  return c
