"""Adding a backbone touches neither the optimizer nor the spine.

A four-conv backbone defined here (with its own ``stage_of``) is given to
``DetectorTask(backbone_fn=...)`` and trained for one step by the real
trainer on synthetic data: the loss is finite, ``frozen_stages=1`` freezes
its stem and first stage through ``stage_of`` alone (unchanged after the
step, no weight decay either) while the later stages and the heads move,
and ``model.neck.in_channels`` is checked against its outputs.
Cost: about 40 s of CPU (one compiled train step of a narrow model).
"""

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from msrcnn_jax import config as config_lib
from msrcnn_jax import variables as variables_lib
from msrcnn_jax.training import trainer
from msrcnn_jax.training.task import DetectorTask

_WIDTHS = (8, 16, 32, 64)


class TinyBackbone(nn.Module):
  """stem (3x3, stride 4) then one 3x3 conv per stage: C2..C5 at strides
  4, 8, 16, 32 with ``_WIDTHS`` channels."""
  frozen_stages: int = 1
  dtype: Any = jnp.float32

  @staticmethod
  def stage_of(name: str):
    return {'stem': 0, 'stage1': 1, 'stage2': 2, 'stage3': 3,
            'stage4': 4}.get(name)

  @nn.compact
  def __call__(self, x, valid_hw):
    del valid_hw
    y = nn.relu(nn.Conv(8, (3, 3), strides=4, name='stem',
                        dtype=self.dtype)(x.astype(self.dtype)))
    if self.frozen_stages >= 0:
      y = jax.lax.stop_gradient(y)
    outs = []
    for i, width in enumerate(_WIDTHS):
      y = nn.relu(nn.Conv(width, (3, 3), strides=1 if i == 0 else 2,
                          name=f'stage{i + 1}', dtype=self.dtype)(y))
      if i + 1 <= self.frozen_stages:
        y = jax.lax.stop_gradient(y)
      outs.append(y)
    return outs


def tiny_backbone(cfg, dtype=jnp.float32):
  return TinyBackbone(frozen_stages=cfg.frozen_stages, dtype=dtype)


def _config():
  c = config_lib.ms_rcnn_config(name='tiny_backbone', style='pytorch')
  c.model.num_classes = 3
  c.model.backbone.frozen_stages = 1
  c.model.neck.update(in_channels=list(_WIDTHS), out_channels=16)
  c.model.rpn_head.update(feat_channels=16, anchor_scales=[4])
  c.model.roi_head.update(finest_scale=28, roi_align_max_samples=2)
  c.model.roi_head.bbox_head.fc_out_channels = 32
  c.model.roi_head.mask_head.update(num_convs=1, conv_out_channels=16)
  c.model.roi_head.mask_iou_head.update(conv_out_channels=16,
                                        fc_out_channels=32)
  c.train.update(global_batch_size=2, base_batch_size=2, max_steps=1,
                 warmup_steps=0, base_lr=0.01, log_every_steps=1,
                 checkpoint_every_steps=0)
  c.train.rpn.num_samples = 32
  c.train.rcnn.num_samples = 16
  c.train.rpn_proposal.update(nms_pre=100, max_per_img=50)
  c.data.update(source='synthetic', img_scale=(64, 64), buckets=((64, 64),),
                max_instances=4, gt_mask_crop_size=16, num_workers=0,
                category_ids=(1, 2, 3),
                class_names=('rectangle', 'ellipse', 'triangle'))
  c.data.synthetic.update(num_train=4, num_val=2, image_size=(64, 64),
                          max_objects=2)
  return c


def test_tiny_backbone_trains_one_step(tmp_path):
  config = _config()
  task = DetectorTask(config, str(tmp_path), backbone_fn=tiny_backbone)
  state, out = trainer.train_and_evaluate(config, str(tmp_path), task=task,
                                          eval_fn=lambda state: {})
  assert out['steps'] == 1 and np.isfinite(out['train']['loss'])
  init_rng, _ = jax.random.split(jax.random.key(config.seed))
  init = variables_lib.flatten(jax.device_get(task.init_variables(init_rng)))
  after = variables_lib.flatten(jax.device_get(state.params))
  for name, frozen in (('stem', True), ('stage1', True), ('stage2', False),
                       ('stage4', False)):
    key = f'params/backbone/{name}/kernel'
    moved = not np.array_equal(after[key[len('params/'):]], init[key])
    assert moved != frozen, name
  key = 'roi_head/bbox_head/fc_cls/kernel'
  assert after[key].shape == (32, 4)
  assert not np.array_equal(after[key], init['params/' + key])

  config.model.neck.in_channels = [8, 16, 32, 128]
  with pytest.raises(config_lib.ConfigError,
                     match=r'backbone gives \[8, 16, 32, 64\] channels'):
    DetectorTask(config, str(tmp_path), backbone_fn=tiny_backbone)
