"""Fine-tuning a converted 80-class checkpoint into a 3-class model.

The mmdetection fixture checkpoint (r50 caffe, narrowed) is converted in the
test, saved in the converter's format and given to the trainer's
``load_init_checkpoint`` for the same model with ``model.num_classes = 3``:
- with ``train.init_skip_patterns = FINETUNE_SKIP_PATTERNS`` exactly the 8
  class-dependent tensors (fc_cls, fc_reg, conv_logits, fc_mask_iou kernels
  and biases) keep their initialisation, each logged with both shapes
  (81 -> 4, 320 -> 12, 80 -> 3, 80 -> 3 outputs); every other tensor equals
  the checkpoint's;
- without patterns, or with a pattern that covers only fc_cls, the load
  fails naming every mismatch the patterns leave (strict elsewhere);
- a pattern that matches nothing is an error too (a typo re-initialises
  nothing silently otherwise).
Cost: about 60 s of CPU (conversion, one jitted init of the model).
"""

import functools
import logging as py_logging

from absl import logging
import jax
import numpy as np
import pytest

from conftest import fixture_config, fixture_path
from msrcnn_jax import config as config_lib
from msrcnn_jax import variables as variables_lib
from msrcnn_jax.convert import mmdet
from msrcnn_jax.modeling import build
from msrcnn_jax.training import partitioning
from msrcnn_jax.training import trainer

_CLASS_LAYERS = {
    'params/roi_head/bbox_head/fc_cls': ((64, 81), (64, 4)),
    'params/roi_head/bbox_head/fc_reg': ((64, 320), (64, 12)),
    'params/roi_head/mask_head/conv_logits': ((1, 1, 32, 80), (1, 1, 32, 3)),
    'params/roi_head/mask_iou_head/fc_mask_iou': ((64, 80), (64, 3)),
}


@pytest.fixture(scope='module')
def converted(tmp_path_factory):
  cfg = fixture_config('r50_caffe_tiny')
  variables, _ = mmdet.convert_checkpoint(
      fixture_path('r50_caffe_tiny', 'checkpoint.pth'), cfg)
  out = str(tmp_path_factory.mktemp('ckpt') / 'coco80')
  variables_lib.save_variables(out, variables,
                               dict(config_name=cfg.name, source='fixture'))
  return out, variables_lib.flatten(variables)


@functools.lru_cache(maxsize=1)
def _three_class_init():
  cfg = fixture_config('r50_caffe_tiny')
  cfg.model.num_classes = 3
  cfg.data.category_ids = (1, 2, 3)
  cfg.data.class_names = ('a', 'b', 'c')
  model = build.build_model(cfg)
  images = np.zeros((1, 64, 64, 3), np.float32)
  pad = np.asarray([[64, 64]], np.int32)
  init = jax.jit(lambda r: model.init(r, images, pad,
                                      method=type(model).init_all))(
                                          jax.random.key(0))
  return cfg, jax.device_get(init)   # callers do not mutate it


def test_class_layers_reinitialised_by_pattern_only(converted, caplog):
  path, coco80 = converted
  cfg, init = _three_class_init()
  replicated = partitioning.replicated_sharding(partitioning.make_mesh())
  flat_init = variables_lib.flatten(init)
  # The dims the shapes table above assumes.
  for layer, (_, ours) in _CLASS_LAYERS.items():
    key = layer + '/kernel'
    assert tuple(flat_init[key].shape) == ours, key

  logging.get_absl_logger().propagate = True
  with caplog.at_level(py_logging.WARNING):
    merged, report = trainer.load_init_checkpoint(
        path, init, replicated, config_lib.FINETUNE_SKIP_PATTERNS)
  flat = variables_lib.flatten(jax.device_get(merged))
  skipped = {k for k, _, _ in report['skipped']}
  assert skipped == {f'{l}/{leaf}' for l in _CLASS_LAYERS
                     for leaf in ('kernel', 'bias')}
  for layer, (theirs, ours) in _CLASS_LAYERS.items():
    line = [r.getMessage() for r in caplog.records
            if f'{layer}/kernel' in r.getMessage()]
    assert line and f'checkpoint {theirs}, model {ours}' in line[0], line
  for key, value in flat.items():
    if key in skipped:
      np.testing.assert_array_equal(value, flat_init[key], err_msg=key)
    else:
      np.testing.assert_array_equal(value, coco80[key], err_msg=key)
  assert report['num_missing'] == 0
  assert report['num_loaded'] == len(flat) - 8


def test_everything_else_stays_strict(converted):
  path, _ = converted
  _, init = _three_class_init()
  loaded, _ = variables_lib.load_variables(path)
  with pytest.raises(variables_lib.VariablesMismatchError) as e:
    variables_lib.merge_variables(init, loaded)
  for layer in _CLASS_LAYERS:
    assert f'shape: {layer}/kernel has' in str(e.value)
  with pytest.raises(variables_lib.VariablesMismatchError) as e:
    variables_lib.merge_variables(init, loaded, [r'bbox_head/fc_cls/'])
  assert 'fc_cls' not in str(e.value)
  assert 'shape: params/roi_head/bbox_head/fc_reg/kernel has (64, 320), ' \
         'the model expects (64, 12)' in str(e.value)
  with pytest.raises(variables_lib.VariablesMismatchError,
                     match="pattern 'fc_clss' of train.init_skip_patterns "
                           'matches no variable'):
    variables_lib.merge_variables(
        init, loaded, list(config_lib.FINETUNE_SKIP_PATTERNS) + ['fc_clss'])
