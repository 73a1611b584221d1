"""Mask R-CNN (mmdetection's ``MaskRCNN`` + ``StandardRoIHead``) as a model
family beside Mask Scoring R-CNN (issue 16, items 1-3).

- The 21 configs of mmdetection 2.28.2's ``configs/mask_rcnn/metafile.yml``
  exist under their mmdetection names, validate, and carry each model's
  settings (style, depth, groups/base_width, normalisation, BN training,
  schedule, multi-scale training scales).
- ``validate`` refuses MaskIoU-only keys with ``StandardRoIHead``, an unknown
  ``roi_head.type`` and a training scale larger than ``data.img_scale``.
- Every one of the 21 full-size state dicts (key -> shape tables built by
  mmdetection itself: ``tests/fixtures/mask_rcnn_state_dict_shapes.json``,
  made by ``tests/fixtures/make_mask_rcnn_state_dict_shapes.py``) maps onto
  our model strictly: every key, every shape, nothing left over.
- A checkpoint of the other family (MS R-CNN checkpoint with a Mask R-CNN
  config and the reverse) is refused, naming the family.
- The parameter tree has no ``mask_iou_head``; the multi-scale draw is
  deterministic and covers the list; a smaller training scale keeps the
  bucket.
- The evaluation report of a model without a MaskIoU head says so.
- ``MASK_RCNN_FINETUNE_SKIP_PATTERNS`` re-initialises a Mask R-CNN's class
  layers for fine-tuning (the MS R-CNN list names a layer it lacks).
Cost: about 10 s on a quiet VM, 20 s under load (shape evaluation only,
nothing compiled).
"""

import functools
import importlib.util
import json
import os
import re

import jax
import numpy as np
import pytest

from conftest import fixture_config, fixture_path
from msrcnn_jax import config as config_lib
from msrcnn_jax import variables as variables_lib
from msrcnn_jax.convert import mmdet
from msrcnn_jax.data import pipeline, transforms
from msrcnn_jax.errors import ConfigError
from msrcnn_jax.evaluation import mask_scoring_report
from msrcnn_jax.modeling import build

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHAPES = os.path.join(REPO, 'tests', 'fixtures',
                      'mask_rcnn_state_dict_shapes.json')


@functools.lru_cache(maxsize=None)
def _tables():
  with open(SHAPES) as f:
    return json.load(f)


NAMES = tuple(_tables()['models'])


def _released_config(name):
  spec = importlib.util.spec_from_file_location(
      name, os.path.join(REPO, 'configs', f'{name}.py'))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config()


def _shapes(name):
  t = _tables()
  return t['tables'][t['models'][name]]


def mask_rcnn_fixture_config(set_name='r50_caffe_tiny'):
  """A narrowed MS R-CNN fixture config turned into its Mask R-CNN."""
  cfg = fixture_config(set_name)
  cfg.model.roi_head.type = 'StandardRoIHead'
  cfg.model.roi_head.mask_iou_head = (
      config_lib.ms_rcnn_config().model.roi_head.mask_iou_head)
  return cfg


def test_the_21_configs_follow_mmdetection():
  assert len(NAMES) == 21
  for name in NAMES:
    c = _released_config(name)
    config_lib.validate(c)
    assert c.name == name
    assert c.model.roi_head.type == 'StandardRoIHead'
    assert not config_lib.has_mask_iou_head(c)
    bb, d, t = c.model.backbone, c.data, c.train
    caffe = '_caffe_' in name
    assert bb.style == ('caffe' if caffe else 'pytorch'), name
    assert bb.depth == (50 if '_r50_' in name else 101), name
    for tag, (g, w) in {'x101_32x4d': (32, 4), 'x101_64x4d': (64, 4),
                        'x101_32x8d': (32, 8)}.items():
      if tag in name:
        assert (bb.groups, bb.base_width) == (g, w), name
    if 'x101_32x8d' in name:   # detectron2's ResNeXt: BGR, std, frozen BN
      assert (d.to_rgb, bb.bn_trainable) == (False, False)
      assert d.std == (57.375, 57.120, 58.395)
    elif caffe:
      assert (d.to_rgb, d.std, bb.bn_trainable) == (
          False, (1.0, 1.0, 1.0), False)
    else:
      assert (d.to_rgb, bb.bn_trainable) == (True, True)
      assert d.std == (58.395, 57.12, 57.375)
    schedule = re.search(r'_(\d)x_coco$', name).group(1)
    assert t.epochs == 12 * int(schedule), name
    if 'mstrain' in name:
      shorts = [s for _, s in d.train_img_scales]
      if schedule == '3' and not caffe or name.startswith(
          'mask_rcnn_r101_caffe_fpn_mstrain'):
        assert shorts == list(range(640, 801)), name   # 'range' mode
      else:
        assert shorts == [640, 672, 704, 736, 768, 800], name   # 'value'
      assert {l for l, _ in d.train_img_scales} == {1333}
    else:
      assert d.train_img_scales == ()
  steps = {n: _released_config(n).train.lr_steps_epochs for n in (
      'mask_rcnn_r50_fpn_2x_coco', 'mask_rcnn_r50_caffe_fpn_mstrain-poly_2x_coco',
      'mask_rcnn_r50_caffe_fpn_mstrain-poly_3x_coco',
      'mask_rcnn_x101_64x4d_fpn_mstrain-poly_3x_coco')}
  assert list(map(list, steps.values())) == [
      [16, 22], [16, 23], [28, 34], [27, 33]]


def _refused(c, *needles):
  with pytest.raises(ConfigError) as e:
    config_lib.validate(c)
  for n in needles:
    assert n in str(e.value), str(e.value)


def test_validate_refuses_what_does_not_apply_to_mask_rcnn():
  base = config_lib.mask_rcnn_config()
  config_lib.validate(base)
  c = config_lib.mask_rcnn_config()
  c.model.roi_head.mask_iou_head.fc_out_channels = 512
  _refused(c, 'model.roi_head.mask_iou_head.fc_out_channels=512',
           'StandardRoIHead')
  c = config_lib.mask_rcnn_config()
  c.train.loss_weights.mask_iou = 1.0
  _refused(c, 'train.loss_weights.mask_iou')
  c = config_lib.mask_rcnn_config()
  c.model.roi_head.type = 'HybridTaskCascadeRoIHead'
  _refused(c, 'model.roi_head.type', 'HybridTaskCascadeRoIHead')
  c = config_lib.mask_rcnn_config(multiscale='value')
  c.data.train_img_scales = ((1333, 640), (1333, 900))
  _refused(c, 'data.train_img_scales', '(1333, 900)')
  # Switching the MaskIoU head on is a valid MS R-CNN config.
  c = config_lib.mask_rcnn_config()
  c.model.roi_head.type = 'MaskScoringRoIHead'
  c.model.roi_head.mask_iou_head.fc_out_channels = 512
  config_lib.validate(c)
  with pytest.raises(ValueError, match='multiscale'):
    config_lib.mask_rcnn_config(multiscale='ranged')


@pytest.mark.parametrize('name', NAMES)
def test_released_state_dicts_map_exactly(name):
  shapes = _shapes(name)
  cfg = _released_config(name)
  report = mmdet.plan_conversion(shapes, cfg)
  assert report.ok, report.format()
  tracked = sum(k.endswith('num_batches_tracked') for k in shapes)
  assert len(report.mapped) == len(shapes) - tracked
  assert report.num_ignored_batches_tracked == tracked
  expected = mmdet.expected_variable_shapes(cfg)
  assert len(expected) == len(report.mapped)
  assert not any('mask_iou_head' in p for p in expected)


def test_the_wrong_family_is_named():
  with open(fixture_path('state_dict_shapes.json')) as f:
    ms_shapes = json.load(f)['ms_rcnn_r50_caffe_fpn_1x_coco']
  mask_cfg = _released_config('mask_rcnn_r50_caffe_fpn_1x_coco')
  report = mmdet.plan_conversion(ms_shapes, mask_cfg)
  assert not report.ok and report.unexpected
  assert all('mask_iou_head' in k for k in report.unexpected)
  assert 'the checkpoint is a Mask Scoring R-CNN' in report.notes[0]
  assert 'ms_rcnn_*' in report.notes[0]
  # The reverse: a Mask R-CNN checkpoint with the MS R-CNN config.
  report = mmdet.plan_conversion(_shapes('mask_rcnn_r50_caffe_fpn_1x_coco'),
                                 config_lib.ms_rcnn_config())
  assert not report.ok and report.missing
  assert all('mask_iou_head' in p for p in report.missing)
  assert 'the checkpoint is a Mask R-CNN' in report.notes[0]
  assert 'mask_rcnn_*' in report.notes[0]
  # With arrays: convert_state_dict puts the family in the error's first line.
  sd, meta = mmdet.load_torch_checkpoint(
      fixture_path('r50_caffe_tiny', 'checkpoint.pth'))
  with pytest.raises(mmdet.ConversionError) as e:
    mmdet.convert_state_dict(sd, mask_rcnn_fixture_config(), meta=meta)
  assert 'the checkpoint is a Mask Scoring R-CNN' in str(e.value).split(
      '\n')[0]
  no_iou = {k: v for k, v in sd.items() if 'mask_iou_head' not in k}
  with pytest.raises(mmdet.ConversionError) as e:
    mmdet.convert_state_dict(no_iou, fixture_config('r50_caffe_tiny'))
  assert 'the checkpoint is a Mask R-CNN' in str(e.value).split('\n')[0]
  # The same tensors without the MaskIoU head convert for Mask R-CNN.
  variables, report = mmdet.convert_state_dict(
      no_iou, mask_rcnn_fixture_config(), meta=meta)
  assert report.ok and set(variables['params']['roi_head']) == {
      'bbox_head', 'mask_head'}


def test_parameter_tree_has_no_mask_iou_head():
  cfg = mask_rcnn_fixture_config()
  build.validate_config(cfg)
  ms = variables_lib.shapes(build.variable_shapes(fixture_config(
      'r50_caffe_tiny')))
  mask = variables_lib.shapes(build.variable_shapes(cfg))
  assert {k for k in ms if k not in mask} == {
      k for k in ms if '/mask_iou_head/' in k}
  assert all(ms[k] == v for k, v in mask.items())


def test_multiscale_draw():
  scales = tuple((1333, s) for s in range(640, 801))
  draws = [pipeline.scale_decision(0, 0, i, scales) for i in range(4000)]
  assert draws == [pipeline.scale_decision(0, 0, i, scales)
                   for i in range(4000)]
  assert set(draws) == set(scales)   # every short side of the range drawn
  assert pipeline.scale_decision(0, 1, 5, scales) != [
      pipeline.scale_decision(0, e, 5, scales) for e in range(2, 6)]
  assert pipeline.scale_decision(0, 0, 0, ()) is None
  # A smaller scale resizes the image, and its boxes, into the same bucket.
  cfg = config_lib.mask_rcnn_config(multiscale='value')
  cfg.data.max_instances = 2
  img = np.zeros((480, 640, 3), np.uint8)
  boxes = np.array([[100., 100., 300., 200.]], np.float32)
  full, _ = transforms.train_transform(img, boxes, np.zeros(1), None,
                                       cfg.data, flip=False)
  small, _ = transforms.train_transform(img, boxes, np.zeros(1), None,
                                        cfg.data, flip=False,
                                        img_scale=(1333, 640))
  assert tuple(full['img_shape']) == (800, 1067)
  assert tuple(small['img_shape']) == (640, 853)
  assert small['image'].shape == full['image'].shape
  np.testing.assert_allclose(small['gt_boxes'][0], boxes[0] * 853 / 640,
                             rtol=1e-3)


def test_report_without_mask_iou_head(tmp_path):
  summary, log = mask_scoring_report.no_mask_iou_head_report(str(tmp_path))
  assert 'no MaskIoU head' in summary['note'] and 'no MaskIoU head' in log
  with open(tmp_path / mask_scoring_report.REPORT_JSON) as f:
    assert 'no MaskIoU head' in json.load(f)['note']


def test_finetune_skip_patterns_of_mask_rcnn():
  """Fine-tuning a converted 80-class Mask R-CNN on 3 classes:
  MASK_RCNN_FINETUNE_SKIP_PATTERNS re-initialises its class layers (the MS
  R-CNN patterns name a MaskIoU layer it lacks and are refused)."""
  cfg = mask_rcnn_fixture_config()
  cfg.model.num_classes = 3
  zeros = lambda c: jax.tree.map(lambda x: np.zeros(x.shape, np.float32),
                                 build.variable_shapes(c))
  init, loaded = zeros(cfg), zeros(mask_rcnn_fixture_config())
  _, report = variables_lib.merge_variables(
      init, loaded, config_lib.MASK_RCNN_FINETUNE_SKIP_PATTERNS)
  assert len(report['skipped']) == 6   # fc_cls, fc_reg, conv_logits x 2
  with pytest.raises(variables_lib.VariablesMismatchError,
                     match='fc_mask_iou'):
    variables_lib.merge_variables(init, loaded,
                                  config_lib.FINETUNE_SKIP_PATTERNS)
