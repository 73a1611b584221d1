"""mask_rcnn_r50_fpn_fp16_1x_coco: Mask R-CNN, ResNet-50 (pytorch style) + FPN, 1x schedule.

mmdetection's released checkpoint reaches box AP 38.1 / mask AP 34.7 on COCO val2017.
Mask R-CNN is mmdetection's MaskRCNN with StandardRoIHead: no MaskIoU head;
mask_score = box score (model.roi_head.type = 'StandardRoIHead').

mmdetection trained it in fp16 (loss scale 512); the weights are float32 and
the model is the one of mask_rcnn_r50_fpn_1x_coco. Training here runs in
train.compute_dtype (float32, or bfloat16 on fp32 parameters).

Convert and evaluate:
  python convert_torch_weights.py --config configs/mask_rcnn_r50_fpn_fp16_1x_coco.py \
      --checkpoint mask_rcnn_r50_fpn_fp16_1x_coco.pth --output ckpt/mask_rcnn_r50_fpn_fp16_1x_coco
  python -m msrcnn_jax.evaluate --config configs/mask_rcnn_r50_fpn_fp16_1x_coco.py \
      --checkpoint ckpt/mask_rcnn_r50_fpn_fp16_1x_coco --coco-dir /data/coco --output metrics.json
Train (16 images per step, as mmdetection's 8 GPUs x 2):
  python train.py --config configs/mask_rcnn_r50_fpn_fp16_1x_coco.py --workdir runs/mask_rcnn_r50_fpn_fp16_1x_coco \
      --config.data.coco_dir=/data/coco
"""

from msrcnn_jax.config import mask_rcnn_config


def get_config():
  return mask_rcnn_config(
      name='mask_rcnn_r50_fpn_fp16_1x_coco',
      depth=50,
      style='pytorch',
      schedule='1x')
