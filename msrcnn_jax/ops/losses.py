"""Elementwise loss terms shared by the RPN and the RoI heads (spec §3).

mmdetection's ``weight_reduce_loss`` divides by ``avg_factor + eps`` with
``eps = finfo(float32).eps`` (v2.25+); ``AVG_FACTOR_EPS`` is that eps.
"""

from __future__ import annotations

import jax.numpy as jnp

AVG_FACTOR_EPS = float(jnp.finfo(jnp.float32).eps)


def bce_with_logits(logits: jnp.ndarray, targets: jnp.ndarray) -> jnp.ndarray:
  """Elementwise ``binary_cross_entropy_with_logits``, unreduced.

  The stable form ``max(x, 0) - x * t + log1p(exp(-|x|))``, as PyTorch.

  Args:
    logits: float array.
    targets: float array of the same shape, in [0, 1].

  Returns:
    float array of that shape.
  """
  return (jnp.maximum(logits, 0) - logits * targets
          + jnp.log1p(jnp.exp(-jnp.abs(logits))))
