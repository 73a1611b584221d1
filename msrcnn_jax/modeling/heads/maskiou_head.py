"""MaskIoUHead: predicts the IoU of each class's mask (spec §1.6, §5.14).

Params: ``convs_0..3`` (plain 3x3 convs, pad 1, bias; ``convs_3`` stride 2),
``fcs_0``, ``fcs_1`` (ReLU), ``fc_mask_iou`` (linear, 80 outputs).
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from msrcnn_jax.modeling import layers
from msrcnn_jax.modeling.heads.box_head import flatten_nchw


class MaskIoUHead(nn.Module):
  """MaskIoU head of MS R-CNN.

  Attributes:
    num_convs: 3x3 convs (4); the last has stride 2.
    num_fcs: hidden FCs (2).
    conv_out_channels: conv width (256).
    fc_out_channels: FC width (1024).
    num_classes: outputs (80).
    dtype: computation dtype.
  """
  num_convs: int = 4
  num_fcs: int = 2
  conv_out_channels: int = 256
  fc_out_channels: int = 1024
  num_classes: int = 80
  dtype: Any = jnp.float32

  def setup(self):
    self.convs = [
        layers.conv(self.conv_out_channels, 3,
                    stride=(2 if i == self.num_convs - 1 else 1),
                    dtype=self.dtype)
        for i in range(self.num_convs)]
    self.fcs = [nn.Dense(self.fc_out_channels,
                         kernel_init=layers.CAFFE2_XAVIER, dtype=self.dtype,
                         param_dtype=jnp.float32)
                for _ in range(self.num_fcs)]
    self.fc_mask_iou = nn.Dense(self.num_classes,
                                kernel_init=nn.initializers.normal(0.01),
                                dtype=self.dtype, param_dtype=jnp.float32)

  def __call__(self, roi_feats: jnp.ndarray,
               mask_logits: jnp.ndarray) -> jnp.ndarray:
    """Predicted mask IoUs.

    Args:
      roi_feats: ``(..., 14, 14, C)`` the mask RoIAlign features that fed
        the mask head.
      mask_logits: ``(..., 28, 28)`` logits of one class per RoI (the
        predicted class at test time, the GT class in training).

    Returns:
      ``(..., num_classes)`` float32 IoU predictions (no activation).
    """
    lead = roi_feats.shape[:-3]
    feats = roi_feats.reshape((-1,) + roi_feats.shape[-3:])
    mask = jax.nn.sigmoid(mask_logits.reshape((-1,) + mask_logits.shape[-2:]))
    # MaxPool2d(2, 2): 28x28 -> 14x14.
    n, h, w = mask.shape
    pooled = mask.reshape(n, h // 2, 2, w // 2, 2).max(axis=(2, 4))
    # The mask is the LAST channel: [mask_feat (C), pooled mask (1)].
    x = jnp.concatenate([feats.astype(self.dtype),
                         pooled[..., None].astype(self.dtype)], axis=-1)
    for conv in self.convs:
      x = nn.relu(conv(x))
    x = flatten_nchw(x)
    for fc in self.fcs:
      x = nn.relu(fc(x))
    out = self.fc_mask_iou(x).astype(jnp.float32)
    return out.reshape(lead + out.shape[-1:])
