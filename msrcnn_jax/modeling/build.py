"""Where a config meets the modules: build, expected shapes, checks."""

from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp
import ml_collections

from msrcnn_jax import config as config_lib
from msrcnn_jax import variables as variables_lib
from msrcnn_jax.modeling.backbone import resnet_from_config
from msrcnn_jax.modeling.detector import MaskScoringRCNN


def build_model(config: ml_collections.ConfigDict, dtype: Any = jnp.float32,
                backbone_fn: Callable[..., Any] = resnet_from_config
                ) -> MaskScoringRCNN:
  """The detector of ``config``; ``backbone_fn(config.model.backbone,
  dtype)`` builds its backbone (see ``backbone.resnet_from_config``)."""
  return MaskScoringRCNN(config, dtype=dtype, backbone_fn=backbone_fn)


def validate_config(config: ml_collections.ConfigDict,
                    backbone_fn: Callable[..., Any] = resnet_from_config
                    ) -> None:
  """``config.validate`` plus the checks that need the modules:
  ``model.neck.in_channels`` must be the backbone's output channels.

  Raises:
    ConfigError: naming the key.
  """
  config_lib.validate(config)
  images = jax.ShapeDtypeStruct((1, 64, 64, 3), jnp.float32)
  pad = jax.ShapeDtypeStruct((1, 2), jnp.int32)
  backbone = backbone_fn(config.model.backbone, jnp.float32)
  outs = jax.eval_shape(
      lambda i, p: backbone.init_with_output(jax.random.key(0), i, p)[0],
      images, pad)
  channels = [int(o.shape[-1]) for o in outs]
  if list(config.model.neck.in_channels) != channels:
    raise config_lib.ConfigError(
        f'model.neck.in_channels is {list(config.model.neck.in_channels)} '
        f'but the backbone gives {channels} channels')


def variable_shapes(config: ml_collections.ConfigDict, image_hw=(64, 64),
                    backbone_fn: Callable[..., Any] = resnet_from_config
                    ) -> dict[str, Any]:
  """``{'params': ..., 'batch_stats': ...}`` of ShapeDtypeStructs (no FLOPs)."""
  model = build_model(config, backbone_fn=backbone_fn)
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
