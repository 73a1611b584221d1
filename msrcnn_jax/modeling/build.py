"""Where a config meets the modules: build, expected shapes, checks."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import ml_collections

from msrcnn_jax.errors import UserError
from msrcnn_jax.modeling.detector import MaskScoringRCNN


class VariablesMismatchError(UserError, ValueError):
  """Loaded variables do not fit the model a config describes."""


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


def flatten(tree: Any) -> dict[str, Any]:
  """``{'params/backbone/conv1/kernel': leaf, ...}``."""
  flat = jax.tree_util.tree_flatten_with_path(tree)[0]
  return {'/'.join(str(getattr(k, 'key', k)) for k in path): leaf
          for path, leaf in flat}


def check_variables(config: ml_collections.ConfigDict, variables: Any,
                    source: str = 'checkpoint') -> None:
  """Raises ``VariablesMismatchError`` naming every missing, unexpected and
  mis-shaped variable of ``variables`` against the model of ``config``."""
  expected = {k: tuple(v.shape) for k, v in
              flatten(variable_shapes(config)).items()}
  got = {k: tuple(getattr(v, 'shape', ())) for k, v in
         flatten(variables).items()}
  missing = sorted(set(expected) - set(got))
  unexpected = sorted(set(got) - set(expected))
  shape = sorted(k for k in set(expected) & set(got) if expected[k] != got[k])
  if missing or unexpected or shape:
    lines = [f'{source} does not fit config {config.get("name", "?")!r}:']
    lines += [f'  missing: {k} {expected[k]}' for k in missing]
    lines += [f'  unexpected: {k} {got[k]}' for k in unexpected]
    lines += [f'  shape: {k} has {got[k]}, config expects {expected[k]}'
              for k in shape]
    raise VariablesMismatchError('\n'.join(lines))


def load_checked_variables(config: ml_collections.ConfigDict,
                           directory: str) -> tuple[dict, dict]:
  """Loads a converted/trained checkpoint and checks it fits ``config``.

  Returns:
    ``(variables, metadata)``.

  Raises:
    CheckpointError: missing or unreadable checkpoint directory.
    VariablesMismatchError: naming every mismatch, and the config the
      checkpoint was converted for when its metadata says.
  """
  from msrcnn_jax.convert import checkpoint_io  # pylint: disable=g-import-not-at-top
  variables, meta = checkpoint_io.load_variables(directory)
  try:
    check_variables(config, variables, source=directory)
  except VariablesMismatchError as e:
    made_for = meta.get('config_name')
    if made_for and made_for != config.get('name'):
      raise VariablesMismatchError(
          f'{e}\n(the checkpoint was converted for config {made_for!r})'
      ) from e
    raise
  return variables, meta
