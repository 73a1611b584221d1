"""The one ml_collections config schema for Mask Scoring R-CNN.

Every file in ``configs/`` calls :func:`ms_rcnn_config` and overrides what it
changes. The tree mirrors mmdetection's resolved config (spec §1) and the
parameter tree (``config.model.roi_head.mask_iou_head`` <->
``params['roi_head']['mask_iou_head']`` <-> ``roi_head.mask_iou_head.*``).
"""

from __future__ import annotations

import ml_collections

# COCO 2017 category ids in sorted order: label i <-> COCO_CATEGORY_IDS[i].
COCO_CATEGORY_IDS = (
    1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 13, 14, 15, 16, 17, 18, 19, 20, 21, 22,
    23, 24, 25, 27, 28, 31, 32, 33, 34, 35, 36, 37, 38, 39, 40, 41, 42, 43, 44,
    46, 47, 48, 49, 50, 51, 52, 53, 54, 55, 56, 57, 58, 59, 60, 61, 62, 63, 64,
    65, 67, 70, 72, 73, 74, 75, 76, 77, 78, 79, 80, 81, 82, 84, 85, 86, 87, 88,
    89, 90)

COCO_CLASSES = (
    'person', 'bicycle', 'car', 'motorcycle', 'airplane', 'bus', 'train',
    'truck', 'boat', 'traffic light', 'fire hydrant', 'stop sign',
    'parking meter', 'bench', 'bird', 'cat', 'dog', 'horse', 'sheep', 'cow',
    'elephant', 'bear', 'zebra', 'giraffe', 'backpack', 'umbrella', 'handbag',
    'tie', 'suitcase', 'frisbee', 'skis', 'snowboard', 'sports ball', 'kite',
    'baseball bat', 'baseball glove', 'skateboard', 'surfboard',
    'tennis racket', 'bottle', 'wine glass', 'cup', 'fork', 'knife', 'spoon',
    'bowl', 'banana', 'apple', 'sandwich', 'orange', 'broccoli', 'carrot',
    'hot dog', 'pizza', 'donut', 'cake', 'chair', 'couch', 'potted plant',
    'bed', 'dining table', 'toilet', 'tv', 'laptop', 'mouse', 'remote',
    'keyboard', 'cell phone', 'microwave', 'oven', 'toaster', 'sink',
    'refrigerator', 'book', 'clock', 'vase', 'scissors', 'teddy bear',
    'hair drier', 'toothbrush')

# Image normalisation per backbone style (spec §1.3).
CAFFE_NORM = dict(mean=(103.530, 116.280, 123.675), std=(1.0, 1.0, 1.0),
                  to_rgb=False)
PYTORCH_NORM = dict(mean=(123.675, 116.28, 103.53), std=(58.395, 57.12, 57.375),
                    to_rgb=True)


def ms_rcnn_config(*,
                   name: str = 'ms_rcnn_r50_caffe_fpn_1x_coco',
                   depth: int = 50,
                   style: str = 'caffe',
                   groups: int = 1,
                   base_width: int = 64,
                   schedule: str = '1x') -> ml_collections.ConfigDict:
  """Returns the full config of a released mmdetection MS R-CNN model.

  Args:
    name: the mmdetection config name; also names checkpoints and logs.
    depth: ResNet/ResNeXt depth, 50 or 101.
    style: 'caffe' (stride on the 1x1 conv1, BGR input, BN gamma/beta frozen)
      or 'pytorch' (stride on the 3x3 conv2, RGB input, gamma/beta trained).
    groups: ResNeXt cardinality (1 for ResNet).
    base_width: ResNeXt width per group (64 for ResNet, 4 for x101_*x4d).
    schedule: '1x' (12 epochs, lr steps at 8 and 11) or '2x' (24; 16, 22).
  """
  if style not in ('caffe', 'pytorch'):
    raise ValueError(f'style must be caffe or pytorch, got {style!r}')
  if schedule not in ('1x', '2x'):
    raise ValueError(f'schedule must be 1x or 2x, got {schedule!r}')
  c = ml_collections.ConfigDict()
  c.name = name
  c.seed = 0

  # ---------------------------------------------------------------- model
  m = c.model = ml_collections.ConfigDict()
  m.num_classes = 80
  m.backbone = dict(
      depth=depth, style=style, groups=groups, base_width=base_width,
      base_channels=64, frozen_stages=1, bn_eps=1e-5,
      # caffe: BN requires_grad=False (gamma/beta frozen);
      # pytorch: gamma/beta trained. Statistics are always frozen.
      bn_trainable=(style == 'pytorch'),
      # Start every bottleneck's last BN scale at 0 (from-scratch training).
      zero_init_residual=False)
  m.neck = dict(in_channels=[256, 512, 1024, 2048], out_channels=256,
                num_outs=5)
  m.rpn_head = dict(
      in_channels=256, feat_channels=256,
      anchor_scales=[8], anchor_ratios=[0.5, 1.0, 2.0],
      anchor_strides=[4, 8, 16, 32, 64],
      target_means=[0.0, 0.0, 0.0, 0.0], target_stds=[1.0, 1.0, 1.0, 1.0])
  m.roi_head = ml_collections.ConfigDict()
  m.roi_head.featmap_strides = [4, 8, 16, 32]
  m.roi_head.finest_scale = 56
  # Static cap on RoIAlign's adaptive sample count per bin side (spec §5.9):
  # exact for every RoI side up to output_size * 16 feature pixels.
  m.roi_head.roi_align_max_samples = 16
  m.roi_head.bbox_roi_extractor = dict(output_size=7, sampling_ratio=0,
                                       aligned=True)
  m.roi_head.mask_roi_extractor = dict(output_size=14, sampling_ratio=0,
                                       aligned=True)
  m.roi_head.bbox_head = dict(
      in_channels=256, fc_out_channels=1024, roi_feat_size=7,
      num_classes=80, target_means=[0.0, 0.0, 0.0, 0.0],
      target_stds=[0.1, 0.1, 0.2, 0.2])
  m.roi_head.mask_head = dict(num_convs=4, in_channels=256,
                              conv_out_channels=256, num_classes=80)
  m.roi_head.mask_iou_head = dict(
      num_convs=4, num_fcs=2, roi_feat_size=14, in_channels=256,
      conv_out_channels=256, fc_out_channels=1024, num_classes=80)

  # ------------------------------------------------------------ inference
  c.test = ml_collections.ConfigDict()
  c.test.rpn = dict(nms_pre=1000, max_per_img=1000, iou_threshold=0.7)
  c.test.rcnn = dict(score_thr=0.05, iou_threshold=0.5, max_per_img=100,
                     mask_thr_binary=0.5,
                     # Static cap on multiclass-NMS candidates (score >
                     # score_thr), taken by score; spec §2.4.
                     max_candidates=8000)
  c.test.batch_size = 1

  # ------------------------------------------------------------- training
  t = c.train = ml_collections.ConfigDict()
  t.rpn = dict(pos_iou_thr=0.7, neg_iou_thr=0.3, min_pos_iou=0.3,
               num_samples=256, pos_fraction=0.5)
  t.rpn_proposal = dict(nms_pre=2000, max_per_img=1000, iou_threshold=0.7)
  t.rcnn = dict(pos_iou_thr=0.5, neg_iou_thr=0.5, min_pos_iou=0.5,
                num_samples=512, pos_fraction=0.25, mask_size=28,
                mask_thr_binary=0.5)
  t.loss_weights = dict(rpn_cls=1.0, rpn_bbox=1.0, cls=1.0, bbox=1.0,
                        mask=1.0, mask_iou=0.5)
  t.optimizer = 'sgd'          # mmdetection's; 'adamw' for from-scratch runs
  t.global_batch_size = 16
  t.base_lr = 0.02            # for base_batch_size images
  t.base_batch_size = 16
  t.momentum = 0.9
  t.weight_decay = 1e-4
  t.warmup_steps = 500
  t.warmup_ratio = 0.001
  t.epochs = 12 if schedule == '1x' else 24
  t.lr_steps_epochs = [8, 11] if schedule == '1x' else [16, 22]
  t.lr_decay = 0.1
  t.grad_clip_norm = 0.0      # 0 = off (mmdetection: grad_clip=None)
  t.compute_dtype = 'float32'  # or 'bfloat16' (parameters stay float32)
  t.max_steps = 0             # 0 = the schedule's epochs
  t.images_per_epoch = 117266  # COCO train2017 images with annotations
  t.checkpoint_every_steps = 5000
  t.keep_checkpoints = 3
  t.log_every_steps = 50
  t.eval_every_steps = 0      # 0 = evaluate only at the end, < 0 = never
  t.init_checkpoint = ''      # converted full or backbone-only checkpoint

  # ----------------------------------------------------------------- data
  d = c.data = ml_collections.ConfigDict()
  d.source = 'coco'           # coco | tfds | synthetic
  d.coco_dir = ''
  d.train_split = 'train2017'
  d.val_split = 'val2017'
  d.tfds_name = 'coco_instance_masks'
  d.tfds_data_dir = ''
  d.img_scale = (1333, 800)   # (long, short) edge limits, keep ratio
  d.size_divisor = 32
  norm = CAFFE_NORM if style == 'caffe' else PYTORCH_NORM
  d.mean = norm['mean']
  d.std = norm['std']
  d.to_rgb = norm['to_rgb']
  d.flip_ratio = 0.5
  # Padded (height, width) shape buckets; each a multiple of size_divisor.
  d.buckets = ((800, 1344), (1344, 800), (800, 800))
  d.max_instances = 100
  # GT masks as box-aligned crops of this size (see training targets).
  d.gt_mask_crop_size = 112
  d.num_workers = 4
  d.prefetch = 2
  d.category_ids = COCO_CATEGORY_IDS
  d.class_names = COCO_CLASSES
  d.synthetic = dict(num_train=2000, num_val=100, image_size=(128, 128),
                     max_objects=4, num_classes=3)
  return c
