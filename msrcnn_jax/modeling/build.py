"""Where a config meets the modules: build, expected shapes, checks."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import ml_collections

from msrcnn_jax import variables as variables_lib
from msrcnn_jax.modeling.detector import MaskScoringRCNN


def build_model(config: ml_collections.ConfigDict) -> MaskScoringRCNN:
  return MaskScoringRCNN(config)


def variable_shapes(config: ml_collections.ConfigDict,
                    image_hw=(64, 64)) -> dict[str, Any]:
  """``{'params': ..., 'batch_stats': ...}`` of ShapeDtypeStructs (no FLOPs)."""
  model = build_model(config)
  images = jax.ShapeDtypeStruct((1,) + tuple(image_hw) + (3,), jnp.float32)
  pad = jax.ShapeDtypeStruct((1, 2), jnp.int32)
  return jax.eval_shape(
      lambda i, p: model.init(jax.random.key(0), i, p,
                              method=MaskScoringRCNN.init_all), images, pad)


def check_variables(config: ml_collections.ConfigDict, variables: Any,
                    source: str = 'checkpoint',
                    made_for: str | None = None) -> None:
  """``variables.check_variables`` against the model of ``config``.

  Raises:
    VariablesMismatchError: naming every missing, unexpected and mis-shaped
      variable (and ``made_for``, the config the checkpoint was written for,
      when it differs from ``config.name``).
  """
  variables_lib.check_variables(
      variables_lib.shapes(variable_shapes(config)), variables, source=source,
      model=config.get('name', '?'), made_for=made_for)


def load_checked_variables(config: ml_collections.ConfigDict,
                           path: str) -> tuple[dict, dict]:
  """Loads a converted directory, a training workdir (newest step) or a step
  directory and checks that it fits ``config`` exactly.

  Returns:
    ``(variables, metadata)``.

  Raises:
    CheckpointError: missing or unreadable checkpoint.
    VariablesMismatchError: naming every mismatch, and the config the
      checkpoint was written for when its metadata says.
  """
  variables, meta = variables_lib.load_variables(path)
  check_variables(config, variables, source=path,
                  made_for=meta.get('config_name'))
  return variables, meta
