"""ms_rcnn_x101_64x4d_fpn_2x_coco: Mask Scoring R-CNN, ResNeXt-101 64x4d (pytorch style) + FPN, 2x schedule.

mmdetection's released checkpoint reaches box AP 42.6 / mask AP 39.5 on COCO val2017.

Convert and evaluate:
  python convert_torch_weights.py --config configs/ms_rcnn_x101_64x4d_fpn_2x_coco.py \
      --checkpoint ms_rcnn_x101_64x4d_fpn_2x_coco.pth --output ckpt/ms_rcnn_x101_64x4d_fpn_2x_coco
  python -m msrcnn_jax.evaluate --config configs/ms_rcnn_x101_64x4d_fpn_2x_coco.py \
      --checkpoint ckpt/ms_rcnn_x101_64x4d_fpn_2x_coco --coco-dir /data/coco --output metrics.json
Train (16 images per step, as mmdetection's 8 GPUs x 2):
  python train.py --config configs/ms_rcnn_x101_64x4d_fpn_2x_coco.py --workdir runs/ms_rcnn_x101_64x4d_fpn_2x_coco \
      --config.data.coco_dir=/data/coco
"""

from msrcnn_jax.config import ms_rcnn_config


def get_config():
  return ms_rcnn_config(
      name='ms_rcnn_x101_64x4d_fpn_2x_coco',
      depth=101,
      style='pytorch',
      groups=64,
      base_width=4,
      schedule='2x',)
