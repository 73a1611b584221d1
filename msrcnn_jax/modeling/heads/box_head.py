"""Shared2FCBBoxHead: two shared FCs, then class logits and deltas (spec §1.6).

Params: ``shared_fcs_0``, ``shared_fcs_1``, ``fc_cls`` (81: the 80 classes in
sorted COCO id order, then background at index 80), ``fc_reg`` (320, row
``4 * c + k`` with k = dx, dy, dw, dh; class-specific).
"""

from __future__ import annotations

from typing import Any, Tuple

import flax.linen as nn
import jax.numpy as jnp

from msrcnn_jax.modeling import layers


def flatten_nchw(x: jnp.ndarray) -> jnp.ndarray:
  """``(..., h, w, C) -> (..., C * h * w)`` in PyTorch's (c, y, x) order.

  So the FC kernel is the transposed torch weight (spec §5.6).
  """
  lead = x.shape[:-3]
  x = jnp.moveaxis(x, -1, -3)
  return x.reshape(lead + (-1,))


class Shared2FCBBoxHead(nn.Module):
  """Box classification and regression head of MS R-CNN.

  Attributes:
    fc_out_channels: width of the shared FCs (1024 released).
    num_classes: foreground classes (80).
    dtype: computation dtype.
  """
  fc_out_channels: int = 1024
  num_classes: int = 80
  dtype: Any = jnp.float32

  def setup(self):
    self.shared_fcs = [
        nn.Dense(self.fc_out_channels, kernel_init=layers.XAVIER_UNIFORM,
                 dtype=self.dtype, param_dtype=jnp.float32)
        for _ in range(2)]
    self.fc_cls = nn.Dense(self.num_classes + 1,
                           kernel_init=nn.initializers.normal(0.01),
                           dtype=self.dtype, param_dtype=jnp.float32)
    self.fc_reg = nn.Dense(4 * self.num_classes,
                           kernel_init=nn.initializers.normal(0.001),
                           dtype=self.dtype, param_dtype=jnp.float32)

  def __call__(self,
               roi_feats: jnp.ndarray) -> Tuple[jnp.ndarray, jnp.ndarray]:
    """Scores and deltas of RoIs.

    Args:
      roi_feats: ``(..., 7, 7, C)`` RoIAlign features.

    Returns:
      ``cls_logits (..., num_classes + 1)`` (softmax logits, background
      last) and ``deltas (..., 4 * num_classes)`` (normalised by the coder's
      stds 0.1, 0.1, 0.2, 0.2), float32.
    """
    x = flatten_nchw(roi_feats)
    for fc in self.shared_fcs:
      x = nn.relu(fc(x))
    return (self.fc_cls(x).astype(jnp.float32),
            self.fc_reg(x).astype(jnp.float32))
