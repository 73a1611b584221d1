"""Model variables on disk, and the strict check that they fit a model.

The ground floor every tool stands on (converter, trainer, ``predict``,
``evaluate``): of ``msrcnn_jax`` it imports only ``errors``.

Variables are ``{'params': ..., 'batch_stats': ...}`` nested dicts; a leaf is
named by its slash-joined path, ``'params/backbone/conv1/kernel'``.

Three kinds of directory hold them, and :func:`load_variables` reads all:

- a **variables directory** (``convert_torch_weights.py`` output, and
  ``<workdir>/final`` written by the trainer at the end)::

    DIR/variables/       orbax StandardCheckpointer tree {'params', 'batch_stats'}
    DIR/metadata.json    {'format', 'config_name', 'source', ...}

- a **training step directory** ``<workdir>/checkpoints/<step>`` (orbax
  CheckpointManager items ``state``, the TrainState as a dict, and
  ``metadata``); only ``params`` and ``batch_stats`` are read;
- a **training workdir** (or its ``checkpoints/``): its newest complete step.

Saving is atomic: everything is written to a sibling temporary directory,
which replaces DIR only once complete, so a failed save never clobbers the
last good checkpoint.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import uuid
from typing import Any, Iterable, Mapping

import jax
import numpy as np
import orbax.checkpoint as ocp

from msrcnn_jax.errors import UserError

FORMAT = 'msrcnn_jax.variables.v1'
VARIABLES = 'variables'
METADATA = 'metadata.json'
# Inside a training workdir (training/checkpointing.py writes these).
TRAIN_CHECKPOINTS = 'checkpoints'
TRAIN_STATE_ITEM = 'state'
TRAIN_METADATA_ITEM = 'metadata'
COLLECTIONS = ('params', 'batch_stats')

Shape = tuple[int, ...]


class CheckpointError(UserError, ValueError):
  """A checkpoint directory is missing, incomplete or not ours."""


class VariablesMismatchError(UserError, ValueError):
  """Variables do not fit the model: missing, unexpected or mis-shaped."""


# ------------------------------------------------------------- tree paths
def path_names(path: Iterable[Any]) -> tuple[str, ...]:
  """A ``jax.tree_util`` key path as names: ``('params', 'backbone', ...)``."""
  names = []
  for entry in path:
    for attr in ('key', 'name', 'idx'):
      if hasattr(entry, attr):
        names.append(str(getattr(entry, attr)))
        break
    else:
      names.append(str(entry))
  return tuple(names)


def flatten(tree: Any) -> dict[str, Any]:
  """``{'params/backbone/conv1/kernel': leaf, ...}`` of a nested tree."""
  return {'/'.join(path_names(path)): leaf for path, leaf in
          jax.tree_util.tree_flatten_with_path(tree)[0]}


def shapes(tree: Any) -> dict[str, Shape]:
  """``{path: shape}`` of arrays or ``ShapeDtypeStruct`` leaves."""
  return {k: tuple(np.shape(v)) for k, v in flatten(tree).items()}


# --------------------------------------------------------- the strict check
def compare(expected: Mapping[str, Shape], got: Mapping[str, Shape]
            ) -> tuple[list[str], list[str], list[str]]:
  """``(missing, unexpected, mis_shaped)`` paths of ``got`` vs ``expected``
  (``{path: shape}`` each), sorted."""
  missing = sorted(set(expected) - set(got))
  unexpected = sorted(set(got) - set(expected))
  mis_shaped = sorted(k for k in set(expected) & set(got)
                      if tuple(expected[k]) != tuple(got[k]))
  return missing, unexpected, mis_shaped


def mismatch_lines(expected: Mapping[str, Shape], got: Mapping[str, Shape],
                   missing=(), unexpected=(), mis_shaped=()) -> list[str]:
  """One line per missing / unexpected / mis-shaped path, with shapes."""
  return ([f'  missing: {k} {tuple(expected[k])}' for k in missing] +
          [f'  unexpected: {k} {tuple(got[k])}' for k in unexpected] +
          [f'  shape: {k} has {tuple(got[k])}, the model expects '
           f'{tuple(expected[k])}' for k in mis_shaped])


def mismatch_counts(missing=(), unexpected=(), mis_shaped=()) -> str:
  """``'2 missing, 316 mis-shaped variables'``: the non-zero counts."""
  parts = [f'{len(v)} {name}' for v, name in ((missing, 'missing'), (
      unexpected, 'unexpected'), (mis_shaped, 'mis-shaped')) if len(v)]
  return (', '.join(parts) or 'no') + ' variables'


def check_variables(expected: Mapping[str, Shape], variables: Any,
                    source: str = 'checkpoint', model: str = '?',
                    made_for: str | None = None) -> None:
  """Raises unless ``variables`` has exactly the paths and shapes expected.

  Args:
    expected: ``{path: shape}`` of the model (e.g. ``shapes(jax.eval_shape(
      model.init, ...))``).
    variables: the loaded tree.
    source: the checkpoint's name for the message.
    model: the config name for the message.
    made_for: the config the checkpoint was written for (its metadata).

  Raises:
    VariablesMismatchError: naming every missing, unexpected and mis-shaped
      variable, and ``made_for`` when it differs from ``model``.
  """
  got = shapes(variables)
  missing, unexpected, mis_shaped = compare(expected, got)
  if not (missing or unexpected or mis_shaped):
    return
  first = (f'{source} does not fit config {model!r}: '
           f'{mismatch_counts(missing, unexpected, mis_shaped)}')
  if made_for and made_for != model:
    first += f' (the checkpoint was written for config {made_for!r})'
  lines = [first] + mismatch_lines(expected, got, missing, unexpected,
                                   mis_shaped)
  raise VariablesMismatchError('\n'.join(lines))


def merge_variables(init: Any, loaded: Any, skip_patterns: Iterable[str] = (),
                    source: str = 'init_checkpoint'
                    ) -> tuple[dict[str, Any], dict[str, Any]]:
  """Replaces leaves of ``init`` by those of ``loaded``, strictly.

  A leaf of ``loaded`` that the model lacks, or whose shape differs, is an
  error unless its path matches one of ``skip_patterns`` (regular
  expressions, ``re.search`` on ``'params/roi_head/bbox_head/fc_cls/kernel'``,
  as big_vision's ``dont_load``): a matching leaf is never loaded and keeps
  its initialisation. Leaves the checkpoint lacks keep their initialisation
  too (a backbone-only checkpoint leaves the neck and heads at init), as
  mmdetection's ``load_from`` does for a re-initialised head.

  Args:
    init: the model's freshly initialised variables.
    loaded: the checkpoint's variables.
    skip_patterns: regexes of paths that may be left at init.
    source: the checkpoint's name for messages.

  Returns:
    ``(merged, report)``: the report has ``loaded`` (paths), ``missing``
    (paths kept at init because the checkpoint lacks them), ``skipped``
    (``(path, checkpoint shape or None, model shape)`` kept at init by a
    pattern), and ``num_loaded`` / ``num_missing``.

  Raises:
    VariablesMismatchError: naming every unexpected or mis-shaped leaf not
      matched by a pattern, a pattern that matches nothing, or a checkpoint
      with nothing in common with the model.
  """
  patterns = [re.compile(p) for p in skip_patterns]
  ours, theirs = shapes(init), shapes(loaded)
  skip = {k for k in set(ours) | set(theirs)
          if any(p.search(k) for p in patterns)}
  unused = [p.pattern for p in patterns
            if not any(p.search(k) for k in skip)]
  missing, unexpected, mis_shaped = compare(
      {k: v for k, v in ours.items() if k not in skip},
      {k: v for k, v in theirs.items() if k not in skip})
  if unexpected or mis_shaped or unused:
    lines = [f'{source} does not fit the model: '
             f'{mismatch_counts((), unexpected, mis_shaped)}'
             + (f', {len(unused)} unused skip patterns' if unused else '')
             + ' (train.init_skip_patterns lists what may be re-initialised)']
    lines += mismatch_lines(ours, theirs, (), unexpected, mis_shaped)
    lines += [f'  pattern {p!r} of train.init_skip_patterns matches no '
              'variable' for p in unused]
    raise VariablesMismatchError('\n'.join(lines))
  loaded_keys = sorted((set(ours) & set(theirs)) - skip)
  if not loaded_keys:
    raise VariablesMismatchError(
        f'{source} has no variable in common with the model')
  flat = flatten(loaded)

  def pick(path, leaf):
    key = '/'.join(path_names(path))
    if key in loaded_keys_set:
      return np.asarray(flat[key], dtype=leaf.dtype)
    return leaf

  loaded_keys_set = set(loaded_keys)
  merged = jax.tree_util.tree_map_with_path(pick, dict(init))
  skipped = sorted((k, theirs.get(k), ours[k]) for k in skip if k in ours)
  return merged, dict(loaded=loaded_keys, missing=missing, skipped=skipped,
                      num_loaded=len(loaded_keys), num_missing=len(missing))


# ------------------------------------------------------------------- disk
def save_variables(directory: str, variables: Mapping[str, Any],
                   metadata: Mapping[str, Any]) -> str:
  """Writes ``variables`` and ``metadata`` to ``directory`` atomically.

  Args:
    directory: target directory (created; replaced if it exists).
    variables: ``{'params': ..., 'batch_stats': ...}`` of numpy/jax arrays.
    metadata: JSON-serialisable dict; should hold ``config_name`` and
      ``source`` (what the variables came from).

  Returns:
    The absolute path of the written checkpoint.
  """
  directory = os.path.abspath(directory)
  os.makedirs(os.path.dirname(directory), exist_ok=True)
  tag = uuid.uuid4().hex[:8]
  tmp = f'{directory}.tmp-{tag}'
  old = f'{directory}.old-{tag}'
  meta = dict(metadata)
  meta['format'] = FORMAT
  try:
    os.makedirs(tmp)
    host = jax.tree.map(np.asarray, dict(variables))
    # This process alone writes (host arrays, no barrier with other hosts):
    # the trainer calls this on process 0 only.
    me = jax.process_index()
    ckptr = ocp.StandardCheckpointer(
        multiprocessing_options=ocp.options.MultiprocessingOptions(
            primary_host=me, active_processes={me}))
    ckptr.save(os.path.join(tmp, VARIABLES), host)
    ckptr.wait_until_finished()
    with open(os.path.join(tmp, METADATA), 'w') as f:
      json.dump(meta, f, indent=1, sort_keys=True, default=str)
  except BaseException:
    shutil.rmtree(tmp, ignore_errors=True)
    raise
  if os.path.exists(directory):
    os.rename(directory, old)
  os.rename(tmp, directory)
  shutil.rmtree(old, ignore_errors=True)
  return directory


def _step_dirs(checkpoints: str) -> list[tuple[int, str]]:
  """``(step, path)`` of the complete step directories, ascending (orbax
  writes ``<step>.orbax-checkpoint-tmp-*`` until a step is complete)."""
  out = []
  for name in os.listdir(checkpoints):
    path = os.path.join(checkpoints, name)
    if name.isdigit() and os.path.isdir(os.path.join(path, TRAIN_STATE_ITEM)):
      out.append((int(name), path))
  return sorted(out)


def resolve(path: str) -> tuple[str, str]:
  """Which kind of checkpoint ``path`` is.

  Returns:
    ``('variables', dir)`` for a variables directory, ``('step', dir)`` for a
    training step directory (a workdir or its ``checkpoints/`` resolves to
    its newest complete step).

  Raises:
    CheckpointError: naming the path and what was expected there.
  """
  path = os.path.abspath(path)
  if not os.path.isdir(path):
    raise CheckpointError(f'checkpoint directory not found: {path}')
  if (os.path.isfile(os.path.join(path, METADATA)) or
      os.path.isdir(os.path.join(path, VARIABLES))):
    return 'variables', path
  if os.path.isdir(os.path.join(path, TRAIN_STATE_ITEM)):
    return 'step', path
  for checkpoints in (os.path.join(path, TRAIN_CHECKPOINTS), path):
    if os.path.isdir(checkpoints):
      steps = _step_dirs(checkpoints)
      if steps:
        return 'step', steps[-1][1]
  raise CheckpointError(
      f'{path} is not an msrcnn_jax checkpoint: expected a converted variables directory '
      f'({METADATA} and {VARIABLES}/, from convert_torch_weights.py), a '
      f'training workdir (with {TRAIN_CHECKPOINTS}/<step>/) or a step '
      'directory')


def _load_step(step_dir: str) -> tuple[dict[str, Any], dict[str, Any]]:
  meta_path = os.path.join(step_dir, TRAIN_METADATA_ITEM, TRAIN_METADATA_ITEM)
  metadata = {}
  if os.path.isfile(meta_path):
    try:
      with open(meta_path) as f:
        metadata = dict(json.load(f))
    except (OSError, json.JSONDecodeError) as e:
      raise CheckpointError(f'unreadable {meta_path}: {e}') from e
  state_path = os.path.join(step_dir, TRAIN_STATE_ITEM)
  try:
    ckptr = ocp.PyTreeCheckpointer()
    tree = ckptr.metadata(state_path).item_metadata.tree
    # Only params and batch_stats: the optimizer state is not read.
    wanted = {k: tree[k] for k in COLLECTIONS if k in tree}
    args = ocp.args.PyTreeRestore(
        item=wanted, restore_args=jax.tree.map(
            lambda _: ocp.RestoreArgs(restore_type=np.ndarray), wanted),
        partial_restore=True)
    state = ckptr.restore(state_path, args=args)
  except Exception as e:  # pylint: disable=broad-except
    raise CheckpointError(f'cannot restore {state_path}: {e}') from e
  metadata.setdefault('step', int(os.path.basename(step_dir.rstrip('/'))))
  return {k: state[k] for k in COLLECTIONS if k in state}, metadata


def _load_variables_dir(directory: str) -> tuple[dict[str, Any],
                                                 dict[str, Any]]:
  meta_path = os.path.join(directory, METADATA)
  var_path = os.path.join(directory, VARIABLES)
  if not (os.path.isfile(meta_path) and os.path.isdir(var_path)):
    raise CheckpointError(
        f'{directory} is not an msrcnn_jax variables checkpoint (expected '
        f'{METADATA} and {VARIABLES}/; convert one with '
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
  return dict(variables), metadata


def load_variables(path: str) -> tuple[dict[str, Any], dict[str, Any]]:
  """Reads variables from any of the three kinds of directory (module doc).

  Returns:
    ``(variables, metadata)``: ``{'params', 'batch_stats'}`` of numpy arrays
    and the metadata dict (``config_name`` when known; a training step's
    also ``step``).

  Raises:
    CheckpointError: if ``path`` does not exist, is none of the three kinds,
      or cannot be read.
  """
  kind, directory = resolve(path)
  if kind == 'variables':
    variables, metadata = _load_variables_dir(directory)
  else:
    variables, metadata = _load_step(directory)
  return jax.tree.map(np.asarray, variables), metadata
