"""Saving and loading converted variables (orbax) with their metadata.

Layout of a checkpoint directory::

  DIR/variables/       orbax StandardCheckpointer tree
                       {'params': ..., 'batch_stats': ...}
  DIR/metadata.json    {'config_name', 'source', 'format', ...}

Saving is atomic: everything is written to a sibling temporary directory,
which replaces DIR only once complete, so a failed save never clobbers the
last good checkpoint.
"""

from __future__ import annotations

import json
import os
import shutil
import uuid
from typing import Any, Dict, Mapping, Tuple

import jax
import numpy as np
import orbax.checkpoint as ocp

from msrcnn_jax.errors import UserError

FORMAT = 'msrcnn_jax.variables.v1'
_VARIABLES = 'variables'
_METADATA = 'metadata.json'


class CheckpointError(UserError, ValueError):
  """A checkpoint directory is missing, incomplete or not ours."""


def save_variables(directory: str, variables: Mapping[str, Any],
                   metadata: Mapping[str, Any]) -> str:
  """Writes ``variables`` and ``metadata`` to ``directory`` atomically.

  Args:
    directory: target directory (created; replaced if it exists).
    variables: ``{'params': ..., 'batch_stats': ...}`` of numpy/jax arrays.
    metadata: JSON-serialisable dict; should hold ``config_name`` and
      ``source`` (the converted file).

  Returns:
    The absolute path of the written checkpoint.
  """
  directory = os.path.abspath(directory)
  parent = os.path.dirname(directory)
  os.makedirs(parent, exist_ok=True)
  tag = uuid.uuid4().hex[:8]
  tmp = f'{directory}.tmp-{tag}'
  old = f'{directory}.old-{tag}'
  meta = dict(metadata)
  meta['format'] = FORMAT
  try:
    os.makedirs(tmp)
    host = jax.tree.map(np.asarray, dict(variables))
    ckptr = ocp.StandardCheckpointer()
    ckptr.save(os.path.join(tmp, _VARIABLES), host)
    ckptr.wait_until_finished()
    with open(os.path.join(tmp, _METADATA), 'w') as f:
      json.dump(meta, f, indent=1, sort_keys=True, default=str)
  except BaseException:
    shutil.rmtree(tmp, ignore_errors=True)
    raise
  if os.path.exists(directory):
    os.rename(directory, old)
  os.rename(tmp, directory)
  shutil.rmtree(old, ignore_errors=True)
  return directory


def load_variables(directory: str) -> Tuple[Dict[str, Any], Dict[str, Any]]:
  """Reads a checkpoint written by ``save_variables``.

  Returns:
    ``(variables, metadata)``; variables hold float32 numpy arrays.

  Raises:
    CheckpointError: if ``directory`` does not exist or is not a complete
      msrcnn_jax variables checkpoint.
  """
  directory = os.path.abspath(directory)
  if not os.path.isdir(directory):
    raise CheckpointError(f'checkpoint directory not found: {directory}')
  meta_path = os.path.join(directory, _METADATA)
  var_path = os.path.join(directory, _VARIABLES)
  if not (os.path.isfile(meta_path) and os.path.isdir(var_path)):
    raise CheckpointError(
        f'{directory} is not an msrcnn_jax variables checkpoint (expected '
        f'{_METADATA} and {_VARIABLES}/; convert one with '
        'convert_torch_weights.py)')
  try:
    with open(meta_path) as f:
      metadata = json.load(f)
  except (OSError, json.JSONDecodeError) as e:
    raise CheckpointError(f'unreadable {meta_path}: {e}') from e
  if metadata.get('format') != FORMAT:
    raise CheckpointError(f'{directory}: unknown format '
                          f'{metadata.get("format")!r}, expected {FORMAT}')
  try:
    variables = ocp.StandardCheckpointer().restore(var_path)
  except Exception as e:  # pylint: disable=broad-except
    raise CheckpointError(f'cannot restore {var_path}: {e}') from e
  return jax.tree.map(np.asarray, dict(variables)), metadata
