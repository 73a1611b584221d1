"""mmdetection checkpoint conversion: rename table, strictness, diagnostics,
backbone-only mode, checkpoint I/O and the CLI (spec §4)."""

import functools
import importlib.util
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from conftest import fixture_config, fixture_path
from msrcnn_jax import variables as variables_lib
from msrcnn_jax.convert import mmdet

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TESTS = os.path.dirname(os.path.abspath(__file__))


def _released_config(name):
  spec = importlib.util.spec_from_file_location(
      name, os.path.join(REPO, 'configs', f'{name}.py'))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config()


@functools.lru_cache(maxsize=None)
def _all_shapes():
  with open(fixture_path('state_dict_shapes.json')) as f:
    return json.load(f)


@functools.lru_cache(maxsize=None)
def _tiny(set_name):
  sd, meta = mmdet.load_torch_checkpoint(
      fixture_path(set_name, 'checkpoint.pth'))
  return sd, meta


def test_contract_key_examples():
  cases = {
      'backbone.layer1.0.downsample.0.weight':
          (4, 'params/backbone/layer1_0/downsample_0/kernel'),
      'backbone.layer3.5.bn2.running_var':
          (1, 'batch_stats/backbone/layer3_5/bn2/var'),
      'backbone.bn1.weight': (1, 'params/backbone/bn1/scale'),
      'neck.lateral_convs.2.conv.bias':
          (1, 'params/neck/lateral_convs_2/conv/bias'),
      'rpn_head.rpn_conv.weight': (4, 'params/rpn_head/rpn_conv/kernel'),
      'roi_head.bbox_head.shared_fcs.0.weight':
          (2, 'params/roi_head/bbox_head/shared_fcs_0/kernel'),
      'roi_head.mask_head.convs.3.conv.weight':
          (4, 'params/roi_head/mask_head/convs_3/conv/kernel'),
      'roi_head.mask_head.upsample.weight':
          (4, 'params/roi_head/mask_head/upsample/kernel'),
      'roi_head.mask_iou_head.fc_mask_iou.bias':
          (1, 'params/roi_head/mask_iou_head/fc_mask_iou/bias'),
  }
  for key, (ndim, path) in cases.items():
    assert mmdet.mmdet_key_to_path(key, ndim) == path
  assert mmdet.mmdet_key_to_path('backbone.bn1.num_batches_tracked', 0) is None
  w = np.arange(2 * 3 * 5 * 7).reshape(2, 3, 5, 7)
  conv = mmdet.torch_to_flax_layout('params/neck/x/conv/kernel', w)
  assert conv.shape == (5, 7, 3, 2) and conv[4, 6, 2, 1] == w[1, 2, 4, 6]
  up = mmdet.torch_to_flax_layout('params/roi_head/mask_head/upsample/kernel',
                                  w)
  assert up.shape == (5, 7, 2, 3) and up[4, 6, 1, 2] == w[1, 2, 4, 6]


@pytest.mark.parametrize('name', [
    'ms_rcnn_r50_caffe_fpn_1x_coco', 'ms_rcnn_r50_caffe_fpn_2x_coco',
    'ms_rcnn_r101_caffe_fpn_1x_coco', 'ms_rcnn_r101_caffe_fpn_2x_coco',
    'ms_rcnn_x101_32x4d_fpn_1x_coco', 'ms_rcnn_x101_64x4d_fpn_1x_coco',
    'ms_rcnn_x101_64x4d_fpn_2x_coco'])
def test_released_state_dicts_map_exactly(name):
  shapes = _all_shapes()[name]
  report = mmdet.plan_conversion(shapes, _released_config(name))
  assert report.ok, report.format()
  tracked = sum(k.endswith('num_batches_tracked') for k in shapes)
  assert len(report.mapped) == len(shapes) - tracked
  assert report.num_ignored_batches_tracked == tracked
  expected = mmdet.expected_variable_shapes(_released_config(name))
  assert len(expected) == len(report.mapped)


def test_tiny_checkpoints_convert_and_keep_values():
  for set_name in ('r50_caffe_tiny', 'x101_pytorch_tiny'):
    sd, meta = _tiny(set_name)
    variables, report = mmdet.convert_state_dict(
        sd, fixture_config(set_name), meta=meta)
    assert report.ok and not report.notes
    p, s = variables['params'], variables['batch_stats']
    np.testing.assert_array_equal(
        p['backbone']['layer1_0']['conv2']['kernel'],
        sd['backbone.layer1.0.conv2.weight'].transpose(2, 3, 1, 0))
    np.testing.assert_array_equal(
        s['backbone']['layer1_0']['downsample_1']['var'],
        sd['backbone.layer1.0.downsample.1.running_var'])
    np.testing.assert_array_equal(
        p['roi_head']['bbox_head']['fc_cls']['kernel'],
        sd['roi_head.bbox_head.fc_cls.weight'].T)
    np.testing.assert_array_equal(
        p['roi_head']['mask_head']['upsample']['kernel'],
        sd['roi_head.mask_head.upsample.weight'].transpose(2, 3, 0, 1))


@pytest.mark.parametrize('set_name', ['r50_caffe_tiny', 'x101_pytorch_tiny'])
def test_expected_shapes_agree_with_the_detector(set_name):
  """The converter's own composition equals the spine's parameter tree."""
  build = pytest.importorskip('msrcnn_jax.modeling.build')
  cfg = fixture_config(set_name)
  ours = mmdet.expected_variable_shapes(cfg)
  spine = variables_lib.shapes(build.variable_shapes(cfg))
  assert ours == spine


def _raises(sd, config, *needles, **kwargs):
  with pytest.raises(mmdet.ConversionError) as e:
    mmdet.convert_state_dict(sd, config, **kwargs)
  for n in needles:
    assert n in str(e.value), (n, str(e.value)[:2000])
  return str(e.value)


def test_missing_wrong_shape_and_extra_keys_fail():
  sd, _ = _tiny('r50_caffe_tiny')
  cfg = fixture_config('r50_caffe_tiny')
  bad = dict(sd)
  del bad['neck.fpn_convs.1.conv.weight']
  _raises(bad, cfg, 'missing: 1', 'params/neck/fpn_convs_1/conv/kernel')
  bad = dict(sd)
  bad['roi_head.mask_head.conv_logits.weight'] = np.zeros((79, 32, 1, 1))
  _raises(bad, cfg, 'mis-shaped: 1', 'roi_head.mask_head.conv_logits.weight',
          '(1, 1, 32, 79)', '(1, 1, 32, 80)')
  bad = dict(sd)
  bad['roi_head.semantic_head.conv.weight'] = np.zeros((3, 3, 1, 1))
  _raises(bad, cfg, 'unexpected: 1', 'roi_head.semantic_head.conv.weight')
  # 'module.' prefixes (DataParallel) are fine.
  variables, _ = mmdet.convert_state_dict(
      {'module.' + k: v for k, v in sd.items()}, cfg)
  assert 'rpn_head' in variables['params']


def test_v1_layout_is_refused():
  shapes = dict(_all_shapes()['ms_rcnn_r50_caffe_fpn_1x_coco'])
  cfg = _released_config('ms_rcnn_r50_caffe_fpn_1x_coco')
  v1 = {}
  for k, s in shapes.items():
    k = k.replace('roi_head.', '')
    if k in ('bbox_head.fc_cls.weight', 'mask_iou_head.fc_mask_iou.weight',
             'mask_head.conv_logits.weight'):
      s = [81] + s[1:]
    if k == 'bbox_head.fc_reg.weight':
      s = [324] + s[1:]
    if k in ('bbox_head.fc_cls.bias', 'mask_iou_head.fc_mask_iou.bias',
             'mask_head.conv_logits.bias'):
      s = [81]
    v1[k] = s
  with pytest.raises(mmdet.ConversionError, match='v1.x') as e:
    mmdet.plan_conversion(v1, cfg)
  assert 'top-level' in str(e.value) and 'LegacyAnchorGenerator' in str(e.value)
  # upgrade_model_version.py output: roi_head.* keys, but 81-way fc_mask_iou.
  upgraded = dict(shapes)
  upgraded['roi_head.mask_iou_head.fc_mask_iou.weight'] = [81, 1024]
  upgraded['roi_head.mask_iou_head.fc_mask_iou.bias'] = [81]
  with pytest.raises(mmdet.ConversionError, match='81-way fc_mask_iou'):
    mmdet.plan_conversion(upgraded, cfg)


def test_checkpoint_config_mismatch_is_named():
  sd, meta = _tiny('r50_caffe_tiny')
  msg = _raises(sd, fixture_config('x101_pytorch_tiny'), 'mismatch',
                'ResNet-50', 'ResNeXt-101', meta=meta)
  assert 'layer3_blocks 6 (checkpoint) vs 23 (config)' in msg
  assert "style='caffe'" in msg
  # Full-size shapes: an R-101 checkpoint with the R-50 config.
  report = mmdet.plan_conversion(
      _all_shapes()['ms_rcnn_r101_caffe_fpn_1x_coco'],
      _released_config('ms_rcnn_r50_caffe_fpn_1x_coco'))
  assert not report.ok
  assert 'depth 101 (checkpoint) vs 50 (config)' in ' '.join(report.notes)
  # Same shapes, other style: only the meta config text can tell.
  cfg = fixture_config('r50_caffe_tiny')
  cfg.model.backbone.style = 'pytorch'
  _raises(sd, cfg, "style='caffe'", "style='pytorch'", 'spec §5.3',
          meta=meta)


@pytest.mark.parametrize('set_name', ['r50_caffe_tiny', 'x101_pytorch_tiny'])
def test_truncated_or_missing_file_is_named(tmp_path, set_name):
  data = open(fixture_path(set_name, 'checkpoint.pth'), 'rb').read()
  path = str(tmp_path / 'truncated.pth')
  with open(path, 'wb') as f:
    f.write(data[:len(data) // 2])
  with pytest.raises(mmdet.ConversionError, match='truncated.pth'):
    mmdet.load_torch_checkpoint(path)
  with pytest.raises(mmdet.ConversionError, match='not found'):
    mmdet.load_torch_checkpoint(str(tmp_path / 'nope.pth'))
  text = tmp_path / 'notes.pth'
  text.write_text('not a checkpoint')
  with pytest.raises(mmdet.ConversionError, match='notes.pth'):
    mmdet.load_torch_checkpoint(str(text))


def test_backbone_only_imagenet_keys():
  sd, _ = _tiny('r50_caffe_tiny')
  cfg = fixture_config('r50_caffe_tiny')
  full, _ = mmdet.convert_state_dict(sd, cfg)
  imagenet = {k[len('backbone.'):]: v for k, v in sd.items()
              if k.startswith('backbone.')}
  imagenet['fc.weight'] = np.zeros((1000, 256), np.float32)
  imagenet['fc.bias'] = np.zeros((1000,), np.float32)
  variables, report = mmdet.convert_state_dict(imagenet, cfg,
                                               backbone_only=True)
  assert set(variables['params']) == {'backbone'}
  assert 'fc.weight' in report.ignored
  np.testing.assert_array_equal(
      variables['params']['backbone']['layer4_2']['conv3']['kernel'],
      full['params']['backbone']['layer4_2']['conv3']['kernel'])
  # A detector checkpoint works too (its non-backbone keys are ignored).
  variables, report = mmdet.convert_state_dict(sd, cfg, backbone_only=True)
  assert 'neck.fpn_convs.0.conv.weight' in report.ignored
  # detectron2-style caffe weights without BN statistics: mean 0, var 1.
  no_stats = {k: v for k, v in imagenet.items() if 'running' not in k}
  variables, report = mmdet.convert_state_dict(no_stats, cfg,
                                               backbone_only=True)
  assert 'batch_stats/backbone/bn1/var' in report.filled
  np.testing.assert_array_equal(
      variables['batch_stats']['backbone']['bn1']['var'], np.ones(8))
  # A backbone missing a conv is still an error.
  del imagenet['layer2.1.conv2.weight']
  _raises(imagenet, cfg, 'params/backbone/layer2_1/conv2/kernel',
          backbone_only=True)


def test_checkpoint_io_errors(tmp_path):
  with pytest.raises(variables_lib.CheckpointError, match='not found'):
    variables_lib.load_variables(str(tmp_path / 'missing'))
  (tmp_path / 'empty').mkdir()
  with pytest.raises(variables_lib.CheckpointError, match='not an msrcnn'):
    variables_lib.load_variables(str(tmp_path / 'empty'))


def test_cli_round_trip(tmp_path):
  config_py = tmp_path / 'tiny_config.py'
  config_py.write_text(
      'import sys\n'
      f'sys.path.insert(0, {TESTS!r})\n'
      'from conftest import fixture_config\n\n'
      'def get_config():\n'
      "  return fixture_config('r50_caffe_tiny')\n")
  out = tmp_path / 'converted'
  ckpt = fixture_path('r50_caffe_tiny', 'checkpoint.pth')
  cmd = [sys.executable, os.path.join(REPO, 'convert_torch_weights.py'),
         f'--config={config_py}', f'--checkpoint={ckpt}', f'--output={out}']
  env = dict(os.environ, JAX_PLATFORMS='cpu')
  run = subprocess.run(cmd, capture_output=True, text=True, env=env,
                       cwd=REPO, timeout=300)
  assert run.returncode == 0, run.stderr[-3000:]
  assert 'tensors mapped: 321' in run.stdout
  assert 'num_batches_tracked: 53' in run.stdout
  variables, meta = variables_lib.load_variables(str(out))
  assert meta['config_name'] == 'ms_rcnn_r50_caffe_fpn_1x_coco'
  assert meta['source'] == os.path.abspath(ckpt)
  sd, _ = _tiny('r50_caffe_tiny')
  np.testing.assert_array_equal(
      variables['params']['neck']['fpn_convs_3']['conv']['kernel'],
      sd['neck.fpn_convs.3.conv.weight'].transpose(2, 3, 1, 0))
  np.testing.assert_array_equal(
      variables['batch_stats']['backbone']['layer3_5']['bn2']['mean'],
      sd['backbone.layer3.5.bn2.running_mean'])
  # A failing conversion exits non-zero, names the problem, keeps the old
  # checkpoint.
  bad = tmp_path / 'bad.pth'
  torch.save({'state_dict': {k: torch.from_numpy(np.asarray(v))
                             for k, v in sd.items()
                             if k != 'rpn_head.rpn_cls.bias'}}, str(bad))
  run = subprocess.run(cmd[:3] + [f'--checkpoint={bad}', f'--output={out}'],
                       capture_output=True, text=True, env=env, cwd=REPO,
                       timeout=300)
  assert run.returncode == 1
  assert 'params/rpn_head/rpn_cls/bias' in run.stderr
  assert variables_lib.load_variables(str(out))[1]['source'] == (
      os.path.abspath(ckpt))
