"""The one ml_collections config schema for Mask Scoring R-CNN.

Every file in ``configs/`` calls :func:`ms_rcnn_config` and overrides what it
changes. The tree mirrors mmdetection's resolved config (spec §1) and the
parameter tree (``config.model.roi_head.mask_iou_head`` <->
``params['roi_head']['mask_iou_head']`` <-> ``roi_head.mask_iou_head.*``).

Every key is read by something. :func:`validate` (called by the entry points
and ``DetectorTask``) refuses, naming the key, keys the schema lacks, values
nothing implements and keys that do not apply; :func:`check_override_flags`
refuses unknown ``--config.<key>`` overrides before ``config_flags`` parses
them; :func:`check_dataset_classes` refuses a training dataset whose
categories are not the model's classes (``model.num_classes``).
"""

from __future__ import annotations

import difflib
import re
import sys
from typing import Any, Sequence

import ml_collections
import numpy as np

from msrcnn_jax.errors import ConfigError  # pylint: disable=unused-import

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

# The class-dependent layers: what fine-tuning a converted COCO checkpoint on
# a dataset with another class count re-initialises (train.init_skip_patterns).
FINETUNE_SKIP_PATTERNS = (
    r'^params/roi_head/bbox_head/fc_cls/', r'^params/roi_head/bbox_head/fc_reg/',
    r'^params/roi_head/mask_head/conv_logits/',
    r'^params/roi_head/mask_iou_head/fc_mask_iou/')
# The same for a Mask R-CNN (model.roi_head.type='StandardRoIHead'), which has
# no MaskIoU head (a pattern that matches nothing is refused).
MASK_RCNN_FINETUNE_SKIP_PATTERNS = FINETUNE_SKIP_PATTERNS[:3]

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
  # The one class-count key: fc_cls (num_classes + 1), fc_reg
  # (4 * num_classes), conv_logits and fc_mask_iou (num_classes) read it, and
  # data.category_ids / data.class_names must list num_classes entries. A
  # training dataset's categories define the classes: its sorted category ids
  # must be data.category_ids (checked before the first step).
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
  # Input channels of every head are inferred from neck.out_channels; the
  # box coders' target_means are 0 (mmdetection's, not configurable here).
  m.rpn_head = dict(
      feat_channels=256,
      anchor_scales=[8], anchor_ratios=[0.5, 1.0, 2.0],
      anchor_strides=[4, 8, 16, 32, 64],
      target_stds=[1.0, 1.0, 1.0, 1.0])
  m.roi_head = ml_collections.ConfigDict()
  # mmdetection's roi_head.type: 'MaskScoringRoIHead' (MS R-CNN: box, mask
  # and MaskIoU heads) or 'StandardRoIHead' (Mask R-CNN: no MaskIoU head, no
  # parameters or loss for it; mask_iou = 1 and mask_scores = box scores, as
  # mmdetection's StandardRoIHead scores its masks). With StandardRoIHead the
  # mask_iou_head keys and train.loss_weights.mask_iou do not apply.
  m.roi_head.type = 'MaskScoringRoIHead'
  m.roi_head.featmap_strides = [4, 8, 16, 32]
  m.roi_head.finest_scale = 56
  # Static cap on RoIAlign's adaptive sample count per bin side (spec §5.9):
  # exact for every RoI side up to output_size * 16 feature pixels.
  m.roi_head.roi_align_max_samples = 16
  # mmcv RoIAlign(sampling_ratio=0, aligned=True) is what is implemented;
  # other values are refused (v1.x models used aligned=False, ratio 2).
  m.roi_head.bbox_roi_extractor = dict(output_size=7, sampling_ratio=0,
                                       aligned=True)
  m.roi_head.mask_roi_extractor = dict(output_size=14, sampling_ratio=0,
                                       aligned=True)
  m.roi_head.bbox_head = dict(fc_out_channels=1024,
                              target_stds=[0.1, 0.1, 0.2, 0.2])
  m.roi_head.mask_head = dict(num_convs=4, conv_out_channels=256)
  m.roi_head.mask_iou_head = dict(num_convs=4, num_fcs=2,
                                  conv_out_channels=256, fc_out_channels=1024)

  # ------------------------------------------------------------ inference
  c.test = ml_collections.ConfigDict()
  c.test.rpn = dict(nms_pre=1000, max_per_img=1000, iou_threshold=0.7)
  c.test.rcnn = dict(score_thr=0.05, iou_threshold=0.5, max_per_img=100,
                     mask_thr_binary=0.5,
                     # Static cap on multiclass-NMS candidates (score >
                     # score_thr), taken by score; spec §2.4.
                     max_candidates=8000)
  c.test.batch_size = 1
  # Where masks are pasted: 'device' (postprocess.paste_on_device, same
  # pixels as the host), 'host', or 'auto' (device unless the backend is
  # the CPU, where the host's box-region paste is cheaper). Records are made
  # in this many worker processes (-1: CPU cores - 1, at most 8, or 0 on
  # the CPU backend; 0: in the calling thread). Workers are spawned: a
  # script calling evaluate/predict needs an `if __name__ == '__main__'`
  # guard (else they fail and the records are made in the calling thread).
  c.test.mask_paste = 'auto'
  c.test.postprocess_workers = -1

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
  # Converted directory, training workdir (newest step) or step directory.
  t.init_checkpoint = ''
  # Regexes (re.search on 'params/roi_head/bbox_head/fc_cls/kernel') of
  # variables NOT loaded from init_checkpoint (kept at their initialisation,
  # each logged with both shapes); any other mismatch is an error. Fine-tune
  # to another class count with FINETUNE_SKIP_PATTERNS.
  t.init_skip_patterns = ()
  # Regexes (re.search on 'params/roi_head/mask_iou_head/fc_mask_iou/kernel')
  # of the parameters to train; empty = every parameter mmdetection trains.
  # When set, everything else is frozen (bit-identical after training, no
  # optimizer state): e.g. ('^params/roi_head/mask_iou_head/',) trains a
  # MaskIoU head added to a converted Mask R-CNN (README "Add mask scoring
  # to a Mask R-CNN").
  t.trainable_patterns = ()

  # ----------------------------------------------------------------- data
  d = c.data = ml_collections.ConfigDict()
  d.source = 'coco'           # coco | tfds | synthetic
  d.coco_dir = ''
  d.train_split = 'train2017'
  d.val_split = 'val2017'
  d.tfds_name = 'coco_instance_masks'
  d.tfds_data_dir = ''
  d.img_scale = (1333, 800)   # (long, short) edge limits, keep ratio
  # Multi-scale training (mmdetection's mstrain configs): per training image
  # one (long, short) scale drawn uniformly from this list (deterministic in
  # seed, epoch and image); each at most img_scale, so the image fits the
  # bucket chosen at img_scale. Empty: every image at img_scale.
  d.train_img_scales = ()
  d.size_divisor = 32
  norm = CAFFE_NORM if style == 'caffe' else PYTORCH_NORM
  d.mean = norm['mean']
  d.std = norm['std']
  d.to_rgb = norm['to_rgb']
  d.flip_ratio = 0.5
  # Padded (height, width) shape buckets; each a multiple of size_divisor.
  d.buckets = ((800, 1344), (1344, 800), (800, 800))
  # > 0: evaluate in this many buckets chosen from the split's image sizes
  # (data.pipeline.buckets_from_sizes) instead of d.buckets.
  d.eval_num_buckets = 0
  d.max_instances = 100
  # GT masks as box-aligned crops of this size (see training targets).
  d.gt_mask_crop_size = 112
  d.num_workers = 4
  d.prefetch = 2
  d.category_ids = COCO_CATEGORY_IDS
  d.class_names = COCO_CLASSES
  d.min_size = 32             # training images with a shorter side are skipped
  # An image file that fails to decode mid-run (corrupt or truncated) is
  # skipped with a warning (training: replaced by the next image of its
  # bucket; evaluation: not evaluated); the run stops with an error once
  # more than this share of the split's images were bad (0 <= x <= 1).
  d.max_bad_image_fraction = 0.01
  # The synthetic dataset's categories (ids 1..num_classes) define its classes.
  d.synthetic = dict(num_train=2000, num_val=100, image_size=(128, 128),
                     max_objects=4, num_classes=3, seed=0, cache=False)
  # Pictures of predictions written after the final evaluation.
  c.num_vis_images = 0
  return c


ROI_HEAD_TYPES = ('MaskScoringRoIHead', 'StandardRoIHead')


def has_mask_iou_head(config: ml_collections.ConfigDict) -> bool:
  """Whether the model of ``config`` (full config or its ``model`` node)
  has a MaskIoU head: ``model.roi_head.type == 'MaskScoringRoIHead'``
  (absent: True, configs written before the key existed)."""
  m = config.model if 'model' in config else config
  return m.roi_head.get('type', 'MaskScoringRoIHead') == 'MaskScoringRoIHead'


def mask_rcnn_config(*,
                     name: str = 'mask_rcnn_r50_caffe_fpn_1x_coco',
                     depth: int = 50,
                     style: str = 'caffe',
                     groups: int = 1,
                     base_width: int = 64,
                     schedule: str = '1x',
                     multiscale: str = '') -> ml_collections.ConfigDict:
  """Returns the full config of a released mmdetection Mask R-CNN model.

  :func:`ms_rcnn_config` with ``model.roi_head.type = 'StandardRoIHead'``
  (mmdetection's ``MaskRCNN``: the same backbone, FPN, RPN, box and mask
  heads, no MaskIoU head).

  Args:
    name, depth, style, groups, base_width: as :func:`ms_rcnn_config`.
    schedule: '1x' (12 epochs), '2x' (24) or '3x' (36, lr steps at 27 and
      33: mmdetection's ``*_mstrain-poly_3x`` configs).
    multiscale: '' (one scale, 1333x800), 'value' (short side drawn per
      training image from ``MSTRAIN_SHORT_SIDES``: mmdetection's
      ``Resize(img_scale=[(1333, 640), (1333, 672), ..., (1333, 800)],
      multiscale_mode='value')``) or 'range' (short side uniform in
      [640, 800]: ``Resize(img_scale=[(1333, 640), (1333, 800)],
      multiscale_mode='range')``), as ``data.train_img_scales``.
  """
  if schedule not in ('1x', '2x', '3x'):
    raise ValueError(f'schedule must be 1x, 2x or 3x, got {schedule!r}')
  c = ms_rcnn_config(name=name, depth=depth, style=style, groups=groups,
                     base_width=base_width,
                     schedule='1x' if schedule == '3x' else schedule)
  c.model.roi_head.type = 'StandardRoIHead'
  if schedule == '3x':
    c.train.epochs = 36
    c.train.lr_steps_epochs = [27, 33]
  if multiscale == 'value':
    c.data.train_img_scales = tuple((1333, s) for s in MSTRAIN_SHORT_SIDES)
  elif multiscale == 'range':
    c.data.train_img_scales = tuple((1333, s) for s in range(640, 801))
  elif multiscale:
    raise ValueError(f"multiscale must be '', 'value' or 'range', got "
                     f'{multiscale!r}')
  return c


# The short sides of mmdetection's mstrain 1x/2x configs (Resize with
# multiscale_mode='value'); the 3x configs draw every integer in [640, 800]
# (multiscale_mode='range' between (1333, 640) and (1333, 800)).
MSTRAIN_SHORT_SIDES = (640, 672, 704, 736, 768, 800)


# ------------------------------------------------------------- validation
def _leaves(config: Any, prefix: str = '') -> dict[str, Any]:
  """``{'model.backbone.depth': 50, ...}``: every leaf key of a config."""
  out = {}
  for key, value in config.items():
    path = f'{prefix}{key}'
    if isinstance(value, (ml_collections.ConfigDict, dict)):
      out.update(_leaves(value, path + '.'))
    else:
      out[path] = value
  return out


def _schema_paths() -> set[str]:
  """Every key path of the schema, leaves and the nodes above them."""
  paths = set()
  for leaf in _leaves(ms_rcnn_config()):
    parts = leaf.split('.')
    paths.update('.'.join(parts[:i]) for i in range(1, len(parts) + 1))
  return paths


def _unknown_key_message(path: str, where: str) -> str:
  parent, _, name = path.rpartition('.')
  siblings = [k.rpartition('.')[2] for k in _schema_paths()
              if k.rpartition('.')[0] == parent]
  near = difflib.get_close_matches(name, siblings, n=1)
  return (f'unknown config key {path} ({where})' +
          (f'; did you mean {parent + "." if parent else ""}{near[0]}?'
           if near else '') +
          ' (msrcnn_jax/config.py lists every key)')


def check_override_flags(argv: Sequence[str], flag: str = 'config') -> None:
  """Raises ``ConfigError`` on a ``--config.<key>`` override naming a key
  the schema does not have (config_flags would fail with a traceback).

  Call before the flags are parsed (``config_flags`` applies overrides while
  parsing); :func:`exit_on_unknown_overrides` does so for the entry points.
  """
  known = _schema_paths()
  pattern = re.compile(rf'^--?(?:no)?{re.escape(flag)}\.([^=]+)')
  for arg in argv:
    found = pattern.match(arg)
    if found and found.group(1) not in known:
      raise ConfigError(_unknown_key_message(found.group(1), arg))


def exit_on_unknown_overrides(argv: Sequence[str]) -> None:
  """:func:`check_override_flags`, as one ``error:`` line and exit 1 (as
  ``errors.run`` ends a user error)."""
  try:
    check_override_flags(argv)
  except ConfigError as e:
    print(f'error: {e}', file=sys.stderr)
    sys.exit(1)


def _refuse(cond: bool, message: str) -> None:
  if cond:
    raise ConfigError(message)


# ------------------------------------------------------ signs and ranges
# The FPN's coarsest backbone stride (C5): every padded input side must be a
# multiple of it, or the top-down pathway's 2x upsampling misaligns.
BACKBONE_STRIDE = 32


def _is_int(v: Any) -> bool:
  return isinstance(v, (int, np.integer)) and not isinstance(v, (bool,
                                                                  np.bool_))


def _is_number(v: Any) -> bool:
  return ((isinstance(v, (int, float, np.integer, np.floating)) and
           not isinstance(v, (bool, np.bool_))) and bool(np.isfinite(v)))


# (test, what a value must be) of the numeric keys.
_POS_INT = (lambda v: _is_int(v) and v >= 1, 'an integer >= 1')
_NONNEG_INT = (lambda v: _is_int(v) and v >= 0, 'an integer >= 0')
_POS = (lambda v: _is_number(v) and v > 0, 'a number > 0')
_NONNEG = (lambda v: _is_number(v) and v >= 0, 'a number >= 0')
_UNIT = (lambda v: _is_number(v) and 0 <= v <= 1, 'in [0, 1]')
_IOU = (lambda v: _is_number(v) and 0 < v <= 1, 'in (0, 1]')
_INT = (_is_int, 'an integer')

# key -> (rule, note): every numeric key of the schema whose sign or range
# can be wrong. Sequence keys (``each``) apply the rule to every entry.
_RANGES = {
    'seed': (_NONNEG_INT, ''),    # numpy SeedSequence entries
    'num_vis_images': (_NONNEG_INT, ''),
    'model.backbone.base_channels': (_POS_INT, ''),
    'model.backbone.base_width': (_POS_INT, ''),
    'model.backbone.groups': (_POS_INT, ''),
    'model.backbone.bn_eps': (_POS, ''),
    'model.backbone.frozen_stages': (
        (lambda v: _is_int(v) and -1 <= v <= 4, 'an integer in [-1, 4]'),
        '-1 = nothing frozen'),
    'model.neck.in_channels': (_POS_INT, 'each'),
    'model.neck.out_channels': (_POS_INT, ''),
    'model.neck.num_outs': (_POS_INT, ''),
    'model.rpn_head.feat_channels': (_POS_INT, ''),
    'model.rpn_head.anchor_scales': (_POS, 'each'),
    'model.rpn_head.anchor_ratios': (_POS, 'each'),
    'model.rpn_head.anchor_strides': (_POS_INT, 'each'),
    'model.rpn_head.target_stds': (_POS, 'each'),
    'model.roi_head.featmap_strides': (_POS_INT, 'each'),
    'model.roi_head.finest_scale': (_POS, ''),
    'model.roi_head.roi_align_max_samples': (_POS_INT, ''),
    'model.roi_head.bbox_roi_extractor.output_size': (_POS_INT, ''),
    'model.roi_head.mask_roi_extractor.output_size': (_POS_INT, ''),
    'model.roi_head.bbox_head.fc_out_channels': (_POS_INT, ''),
    'model.roi_head.bbox_head.target_stds': (_POS, 'each'),
    'model.roi_head.mask_head.num_convs': (_NONNEG_INT, ''),
    'model.roi_head.mask_head.conv_out_channels': (_POS_INT, ''),
    'model.roi_head.mask_iou_head.num_convs': (_NONNEG_INT, ''),
    'model.roi_head.mask_iou_head.num_fcs': (_NONNEG_INT, ''),
    'model.roi_head.mask_iou_head.conv_out_channels': (_POS_INT, ''),
    'model.roi_head.mask_iou_head.fc_out_channels': (_POS_INT, ''),
    'test.rpn.nms_pre': (_POS_INT, ''),
    'test.rpn.max_per_img': (_POS_INT, ''),
    'test.rpn.iou_threshold': (_IOU, ''),
    'test.rcnn.score_thr': (
        (lambda v: _is_number(v) and 0 <= v < 1, 'in [0, 1)'), ''),
    'test.rcnn.iou_threshold': (_IOU, ''),
    'test.rcnn.max_per_img': (_POS_INT, ''),
    'test.rcnn.mask_thr_binary': (_UNIT, ''),
    'test.rcnn.max_candidates': (_POS_INT, ''),
    'test.batch_size': (_POS_INT, ''),
    'test.postprocess_workers': (
        (lambda v: _is_int(v) and v >= -1, 'an integer >= -1'),
        '-1 = automatic, 0 = in the calling thread'),
    'train.rpn.pos_iou_thr': (_UNIT, ''),
    'train.rpn.neg_iou_thr': (_UNIT, ''),
    'train.rpn.min_pos_iou': (_UNIT, ''),
    'train.rpn.num_samples': (_POS_INT, ''),
    'train.rpn.pos_fraction': (_IOU, ''),
    'train.rpn_proposal.nms_pre': (_POS_INT, ''),
    'train.rpn_proposal.max_per_img': (_POS_INT, ''),
    'train.rpn_proposal.iou_threshold': (_IOU, ''),
    'train.rcnn.pos_iou_thr': (_UNIT, ''),
    'train.rcnn.neg_iou_thr': (_UNIT, ''),
    'train.rcnn.min_pos_iou': (_UNIT, ''),
    'train.rcnn.num_samples': (_POS_INT, ''),
    'train.rcnn.pos_fraction': (_IOU, ''),
    'train.rcnn.mask_size': (_POS_INT, ''),
    'train.rcnn.mask_thr_binary': (_UNIT, ''),
    'train.loss_weights.rpn_cls': (_NONNEG, ''),
    'train.loss_weights.rpn_bbox': (_NONNEG, ''),
    'train.loss_weights.cls': (_NONNEG, ''),
    'train.loss_weights.bbox': (_NONNEG, ''),
    'train.loss_weights.mask': (_NONNEG, ''),
    'train.loss_weights.mask_iou': (_NONNEG, ''),
    'train.global_batch_size': (_POS_INT, ''),
    'train.base_lr': (_POS, ''),
    'train.base_batch_size': (_POS_INT, ''),
    'train.momentum': (
        (lambda v: _is_number(v) and 0 <= v < 1, 'in [0, 1)'), ''),
    'train.weight_decay': (_NONNEG, ''),
    'train.warmup_steps': (_NONNEG_INT, '0 = no warm-up'),
    'train.warmup_ratio': (_UNIT, ''),
    'train.epochs': (_POS_INT, ''),
    'train.lr_steps_epochs': (_POS_INT, 'each'),
    'train.lr_decay': (_POS, ''),
    'train.grad_clip_norm': (_NONNEG, '0 = no clipping'),
    'train.max_steps': (_NONNEG_INT, "0 = the schedule's epochs"),
    'train.images_per_epoch': (_POS_INT, ''),
    'train.checkpoint_every_steps': (_NONNEG_INT, '0 = only at the end'),
    'train.keep_checkpoints': (_NONNEG_INT, '0 = keep all'),
    'train.log_every_steps': (_POS_INT, ''),
    'train.eval_every_steps': (
        _INT, '0 = only at the end, < 0 = never'),
    'data.img_scale': (_POS, 'each'),
    'data.size_divisor': (_POS_INT, ''),
    'data.flip_ratio': (_UNIT, ''),
    'data.max_bad_image_fraction': (_UNIT, ''),
    'data.eval_num_buckets': (_NONNEG_INT, '0 = data.buckets'),
    'data.max_instances': (_POS_INT, ''),
    'data.gt_mask_crop_size': (_POS_INT, ''),
    'data.num_workers': (_NONNEG_INT, '0 = in the calling thread'),
    'data.prefetch': (_NONNEG_INT, ''),
    'data.min_size': (_NONNEG_INT, ''),
    'data.mean': (
        (_is_number, 'a finite number'), 'each'),
    'data.std': (_POS, 'each'),
    'data.synthetic.num_train': (_POS_INT, ''),
    'data.synthetic.num_val': (_POS_INT, ''),
    'data.synthetic.image_size': (_POS_INT, 'each'),
    'data.synthetic.max_objects': (_POS_INT, ''),
    'data.synthetic.num_classes': (_POS_INT, ''),
    'data.synthetic.seed': (_NONNEG_INT, ''),
}

# Sequence keys and the number of entries they must have (None: >= 1).
_LENGTHS = {
    'data.img_scale': 2, 'data.mean': 3, 'data.std': 3,
    'data.synthetic.image_size': 2, 'model.rpn_head.target_stds': 4,
    'model.roi_head.bbox_head.target_stds': 4,
    'model.neck.in_channels': None, 'model.rpn_head.anchor_scales': None,
    'model.rpn_head.anchor_ratios': None,
    'model.rpn_head.anchor_strides': None,
    'model.roi_head.featmap_strides': None,
}


def _check_ranges(got: dict[str, Any]) -> None:
  """Refuses, naming the key and value, a numeric value out of its range
  (``_RANGES``), a sequence of the wrong length (``_LENGTHS``), decay epochs
  that do not increase and buckets that are not multiples of the backbone
  stride and of ``data.size_divisor``."""
  for key, length in _LENGTHS.items():
    value = got[key]
    ok = isinstance(value, (list, tuple)) and (
        len(value) == length if length else len(value) >= 1)
    _refuse(not ok, f'{key}={_show(value)} must be a list of '
            f'{length if length else "one or more"} numbers')
  for key, ((test, what), note) in _RANGES.items():
    value = got[key]
    each = note == 'each'
    values = list(value) if each and isinstance(value, (list, tuple)) else [
        value]
    if each and not isinstance(value, (list, tuple)):
      values = [None]
    bad = [v for v in values if not test(v)]
    if bad:
      hint = '' if each or not note else f' ({note})'
      raise ConfigError(f'{key}={_show(value)}: '
                        f'{"every entry " if each else ""}must be {what}'
                        f'{hint}')
  epochs = list(got['train.lr_steps_epochs'])
  _refuse(any(b <= a for a, b in zip(epochs, epochs[1:])),
          f'train.lr_steps_epochs={_show(epochs)} must increase')
  divisor = int(got['data.size_divisor'])
  buckets = got['data.buckets']
  _refuse(not isinstance(buckets, (list, tuple)) or not buckets,
          f'data.buckets={_show(buckets)} must list one or more (height, '
          'width) shapes')
  for bucket in buckets:
    ok = (isinstance(bucket, (list, tuple)) and len(bucket) == 2 and
          all(_is_int(v) and v > 0 for v in bucket))
    _refuse(not ok, f'data.buckets={_show(buckets)}: {_show(bucket)} is not '
            'a (height, width) pair of positive integers')
    for multiple, why in ((BACKBONE_STRIDE, "the backbone's stride"),
                          (divisor, 'data.size_divisor')):
      _refuse(any(v % multiple for v in bucket),
              f'data.buckets={_show(buckets)}: {_show(bucket)} is not a '
              f'multiple of {multiple} ({why}); e.g. '
              f'{tuple(-(-int(v) // multiple) * multiple for v in bucket)}')
  n = got['data.eval_num_buckets']
  _refuse(n > 0 and divisor % BACKBONE_STRIDE != 0,
          f'data.size_divisor={divisor} must be a multiple of '
          f"{BACKBONE_STRIDE} (the backbone's stride) with "
          f'data.eval_num_buckets={n}, whose buckets are padded image sizes')


def _show(value: Any) -> str:
  """A config value as the user wrote it (tuples of tuples, not lists)."""
  if isinstance(value, (list, tuple)):
    return '(' + ', '.join(_show(v) for v in value) + (
        ',)' if len(value) == 1 else ')')
  return repr(value)


def validate(config: ml_collections.ConfigDict) -> None:
  """Checks a whole config before anything is built.

  Refuses, naming the key: keys the schema lacks (e.g. added by a config
  file) or that a config file removed; values that nothing implements
  (RoIAlign ``sampling_ratio`` other than 0 or ``aligned=False``, unknown
  style/source/optimizer); inconsistent values (class names/ids vs
  ``model.num_classes``, ``train.rcnn.mask_size`` vs the mask head's output); keys set that do not
  apply (``data.coco_dir`` without ``data.source='coco'``,
  ``data.tfds_data_dir`` without 'tfds', ``train.momentum`` changed with
  AdamW, ``train.init_skip_patterns`` without ``train.init_checkpoint``);
  numeric values out of range where a wrong sign or size is meaningless
  (``train.base_lr <= 0``, ``train.max_steps < 0``, ``momentum`` outside
  [0, 1), IoU thresholds outside [0, 1], ``data.img_scale`` or
  ``data.max_instances`` not positive, a bucket that is not a multiple of
  32 (the backbone's stride) and of ``data.size_divisor``, decay epochs
  that do not increase; the table ``_RANGES`` lists every key's range).

  Raises:
    ConfigError: the first problem found, naming the key and value.
  """
  schema = _leaves(ms_rcnn_config())
  got = _leaves(config)
  for path in sorted(set(got) - set(schema)):
    raise ConfigError(_unknown_key_message(path, 'set in the config file'))
  for path in sorted(set(schema) - set(got)):
    raise ConfigError(f'config key {path} is missing (a config file replaced '
                      'its parent; use .update(...) instead)')
  _check_ranges(got)
  m, d, t = config.model, config.data, config.train
  b = m.backbone
  _refuse(b.style not in ('caffe', 'pytorch'),
          f"model.backbone.style must be 'caffe' or 'pytorch', got {b.style!r}")
  _refuse(m.neck.num_outs != len(m.rpn_head.anchor_strides),
          f'model.rpn_head.anchor_strides has {len(m.rpn_head.anchor_strides)}'
          f' levels but model.neck.num_outs is {m.neck.num_outs}')
  n = m.num_classes
  _refuse(not isinstance(n, int) or n < 1,
          f'model.num_classes must be a positive integer, got {n!r}')
  for key in ('category_ids', 'class_names'):
    _refuse(len(d[key]) != n,
            f'data.{key} lists {len(d[key])} entries but model.num_classes '
            f'is {n}: {tuple(d[key])}')
  _refuse(len(set(d.category_ids)) != n,
          f'data.category_ids repeats an id: {tuple(d.category_ids)}')
  r = m.roi_head
  for name in ('bbox_roi_extractor', 'mask_roi_extractor'):
    ext = r[name]
    _refuse(ext.sampling_ratio != 0 or ext.aligned is not True,
            f'model.roi_head.{name}: only mmcv RoIAlign(sampling_ratio=0, '
            f'aligned=True) is implemented, got sampling_ratio='
            f'{ext.sampling_ratio!r}, aligned={ext.aligned!r}')
  _refuse(t.rcnn.mask_size != 2 * r.mask_roi_extractor.output_size,
          f'train.rcnn.mask_size is {t.rcnn.mask_size} but the mask head '
          f'predicts 2 x mask_roi_extractor.output_size = '
          f'{2 * r.mask_roi_extractor.output_size}')
  _refuse(r.type not in ROI_HEAD_TYPES,
          f'model.roi_head.type must be one of {ROI_HEAD_TYPES}, got '
          f'{r.type!r}')
  if r.type == 'StandardRoIHead':
    for path in ('model.roi_head.mask_iou_head.num_convs',
                 'model.roi_head.mask_iou_head.num_fcs',
                 'model.roi_head.mask_iou_head.conv_out_channels',
                 'model.roi_head.mask_iou_head.fc_out_channels',
                 'train.loss_weights.mask_iou'):
      _refuse(got[path] != schema[path],
              f'{path}={got[path]!r} does not apply with model.roi_head.type='
              "'StandardRoIHead' (Mask R-CNN has no MaskIoU head; set "
              "model.roi_head.type='MaskScoringRoIHead' to add one)")
  for scale in d.train_img_scales:
    _refuse(len(scale) != 2 or min(scale) < 1
            or max(scale) > max(d.img_scale)
            or min(scale) > min(d.img_scale),
            f'data.train_img_scales holds {tuple(scale)!r}: each entry is a '
            '(long, short) pair of positive sides at most data.img_scale='
            f'{tuple(d.img_scale)} (the bucket is chosen at img_scale)')
  _refuse(d.source not in ('coco', 'tfds', 'synthetic'),
          f"data.source must be 'coco', 'tfds' or 'synthetic', got "
          f'{d.source!r}')
  _refuse(bool(d.coco_dir) and d.source != 'coco',
          f'data.coco_dir={d.coco_dir!r} does not apply with '
          f"data.source={d.source!r} (set data.source='coco')")
  _refuse(bool(d.tfds_data_dir) and d.source != 'tfds',
          f'data.tfds_data_dir={d.tfds_data_dir!r} does not apply with '
          f"data.source={d.source!r} (set data.source='tfds')")
  _refuse(t.optimizer not in ('sgd', 'adamw'),
          f"train.optimizer must be 'sgd' or 'adamw', got {t.optimizer!r}")
  _refuse(t.optimizer == 'adamw' and t.momentum != schema['train.momentum'],
          f'train.momentum={t.momentum} does not apply with '
          "train.optimizer='adamw'")
  _refuse(bool(t.init_skip_patterns) and not t.init_checkpoint,
          f'train.init_skip_patterns={tuple(t.init_skip_patterns)} does not '
          'apply without train.init_checkpoint')
  for pattern in t.trainable_patterns:
    try:
      re.compile(pattern)
    except (re.error, TypeError) as e:
      raise ConfigError(f'train.trainable_patterns: {pattern!r} is not a '
                        f'regular expression ({e})') from None
  _refuse(t.compute_dtype not in ('float32', 'bfloat16'),
          "train.compute_dtype must be 'float32' or 'bfloat16', got "
          f'{t.compute_dtype!r}')


def check_dataset_classes(config: ml_collections.ConfigDict,
                          cat_ids: Sequence[int], class_names: Sequence[str],
                          dataset: str) -> None:
  """Refuses a dataset whose categories do not fit the model.

  mmdetection's ``NumClassCheckHook``: the dataset's categories (sorted ids;
  label i <-> cat_ids[i]) must number ``model.num_classes`` and be
  ``data.category_ids`` (so that predictions name the right categories).

  Raises:
    ConfigError: naming the dataset's categories and the model's count.
  """
  n = config.model.num_classes
  cats = ', '.join(f'{i}:{name}' for i, name in zip(cat_ids, class_names))
  if len(cat_ids) != n:
    raise ConfigError(
        f'{dataset} has {len(cat_ids)} categories ({cats}) but the model has '
        f'model.num_classes={n}; set --config.model.num_classes='
        f'{len(cat_ids)} and data.category_ids / data.class_names to the '
        "dataset's categories")
  if tuple(cat_ids) != tuple(config.data.category_ids):
    raise ConfigError(
        f'{dataset} has category ids {tuple(cat_ids)} ({cats}) but '
        f'data.category_ids is {tuple(config.data.category_ids)}; set '
        "data.category_ids and data.class_names to the dataset's categories")
