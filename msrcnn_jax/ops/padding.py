"""Bucket padding: which part of a padded feature map belongs to an image.

A batch is padded to a bucket shape larger than each image's own /32
``pad_shape`` (the size mmdetection's tensor of that image has). Every
stride-2 layer of the network (7x7/p3 stem, 3x3/p1 max pool and convs,
1x1/p0 convs, the kernel-1 P6 pool) maps ``n`` rows to ``ceil(n / 2)``, so an
image's valid feature size at total stride ``s`` is ``ceil(pad_shape / s)``:
the backbone and FPN zero what lies beyond it, anchors beyond it are invalid
(mmdetection's ``valid_flags``) and RoIAlign's bilinear boundary rules use it.
"""

from __future__ import annotations

import jax.numpy as jnp


def valid_size(pad_shape, stride):
  """``ceil(pad_shape / stride)``: the valid feature size at ``stride``.

  Args:
    pad_shape: ``(..., 2)`` int ``(h, w)`` of each image padded to /32 (any
      int array, converted to int32), or a Python int for static sizes.
    stride: the feature map's total stride: a Python int, or an int array
      broadcastable against ``pad_shape`` (e.g. one stride per RoI).

  Returns:
    int32 array of the broadcast shape (not clipped to the map); a Python
    int when both arguments are Python ints.
  """
  if not isinstance(pad_shape, int):
    pad_shape = jnp.asarray(pad_shape, jnp.int32)
  return (pad_shape + (stride - 1)) // stride

