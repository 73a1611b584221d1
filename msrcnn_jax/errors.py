"""User errors: their exception type and the command-line entry point.

A user error is a mistake in what the user gave a command: a path, a
dataset, a config or a checkpoint. The code that validates that input raises
``UserError`` (or a subclass: ``data.coco.CocoFormatError``,
``data.image_io.ImageReadError``, ``variables.CheckpointError``,
``convert.mmdet.ConversionError``, ``variables.VariablesMismatchError``,
``ConfigError``) with a message naming the file, id, key, shape or value.

``run(main)`` is the entry point of every command-line tool (``train.py``,
``convert_torch_weights.py``, ``python -m msrcnn_jax.predict`` and
``msrcnn_jax.evaluate``, ``msrcnn_jax.export``): a user error, a bad flag
or a config file that cannot be loaded ends in one ``error: ...`` line on
stderr, the last line of the output, and exit status 1, without a traceback.
A message's context lines (e.g. one per mis-shaped variable) are printed
above it; more than ``MAX_CONTEXT_LINES`` of them are summarised (the first
few and a count) and written in full to a file the error line names. Any
other exception is a programming error and keeps its traceback. ``--help``
(and ``--helpfull``, ``--helpshort``) print the usage and exit 0. Once the
flags are parsed, ``console.configure_logging`` quiets other libraries'
logging (absl's ``--verbosity`` brings it back).
"""

from __future__ import annotations

import contextlib
import os
import sys
import tempfile
import time
from typing import Callable, Iterator, NoReturn, Sequence

from absl import app
from absl import flags


class UserError(Exception):
  """A mistake in the user's input; the message says what and where.

  The first line of the message is the error. Further lines (e.g. a
  converter report) are context that ``run`` prints above the error line.
  """


class ConfigError(UserError, ValueError):
  """A config value that cannot work (with the data or the devices)."""


# Context lines printed above an error line; past this many, the first
# CONTEXT_SHOWN and a count are printed and the full message goes to a file.
MAX_CONTEXT_LINES = 12
CONTEXT_SHOWN = 5


def _write_details(lines: Sequence[str]) -> str | None:
  """Writes a long error message to a file; returns its path (None if no
  file could be written)."""
  name = f'msrcnn_jax-error-{time.strftime("%Y%m%d-%H%M%S")}-{os.getpid()}.txt'
  for directory in (tempfile.gettempdir(), os.getcwd()):
    path = os.path.join(directory, name)
    try:
      with open(path, 'w') as f:
        f.write('\n'.join(lines) + '\n')
      return path
    except OSError:
      continue
  return None


def summarise_context(message: str) -> tuple[str, list[str]]:
  """The error line and the context lines ``run`` prints above it.

  A message is an error line and optional context lines: unindented
  summary lines (``mis-shaped: 316``) and indented items (one per
  variable). When there are more than ``MAX_CONTEXT_LINES`` context lines,
  the summary lines and the first ``CONTEXT_SHOWN`` items are kept,
  followed by ``... and N more``; the whole message is written to a file
  (in the temporary directory) whose path ends the error line, which stays
  self-contained (a trailing colon is dropped).

  Args:
    message: the exception's message.

  Returns:
    ``(error line without the 'error: ' prefix, context lines to print)``.
  """
  lines = str(message).strip().splitlines() or ['(no message)']
  first, context = lines[0], lines[1:]
  if len(context) <= MAX_CONTEXT_LINES:
    return first, context
  shown, summaries, items, hidden = [], 0, 0, 0
  for line in context:
    if not line[:1].isspace() and summaries < MAX_CONTEXT_LINES:
      shown.append(line)
      summaries += 1
    elif items < CONTEXT_SHOWN:
      shown.append(line)
      items += 1
    else:
      hidden += 1
  path = _write_details(lines)
  shown.append(f'  ... and {hidden} more' +
               (f' (all in {path})' if path else ''))
  first = first.rstrip().rstrip(':')
  if path:
    first += f' (full list: {path})'
  return first, shown


def _exit_with(message: str) -> NoReturn:
  first, context = summarise_context(message)
  sys.stdout.flush()
  for line in context:
    print(line, file=sys.stderr)
  print(f'error: {first}', file=sys.stderr)
  sys.stderr.flush()
  sys.exit(1)


def _one_line(e: BaseException) -> str:
  """An exception's message on one line (wrapped KeyErrors unquoted)."""
  while e.args and isinstance(e.args[0], BaseException):
    e = e.args[0]
  if isinstance(e, SyntaxError):
    text = f'{e.msg} ({e.filename}, line {e.lineno})'
  elif isinstance(e, LookupError) and e.args and isinstance(e.args[0], str):
    text = e.args[0]  # str(KeyError) is the repr of its message
  else:
    text = str(e)
  return ' '.join(line.strip() for line in text.splitlines() if line.strip())


@contextlib.contextmanager
def config_errors_reported() -> Iterator[None]:
  """Reports any exception raised while loading a config as a user error.

  For ``DEFINE_config_file`` at module level: with no ``--config`` flag,
  ml_collections loads the default config and applies the
  ``--config.<key>=<value>`` overrides right there, before ``run`` starts.
  """
  try:
    yield
  except Exception as e:  # pylint: disable=broad-except
    _exit_with(f'bad config or override ({type(e).__name__}): '
               f'{_one_line(e)}')


_HELP_FLAGS = frozenset(('help', 'h', '?', 'helpfull', 'helpshort',
                         'helpxml'))


def _asks_for_help(argv: Sequence[str]) -> bool:
  for arg in argv[1:]:
    if arg == '--':
      break
    if arg.startswith('-') and arg.lstrip('-').split('=')[0] in _HELP_FLAGS:
      return True
  return False


def _config_file_not_found(flag) -> str | None:
  """The missing file of a config-file flag whose load failed, if that is
  why it failed (ml_collections says ``Failed loading config file ...``)."""
  path = getattr(flag, '_config_filename', None)
  if not isinstance(path, str) or not path:
    return None
  path = path.split(':', 1)[0]       # 'file.py:param' parameterised configs
  return None if os.path.isfile(path) else path


def _parse_flags(argv: Sequence[str]) -> list[str]:
  """absl's flag parsing; bad flags and configs are user errors; the help
  flags exit 0 (absl exits 1 after printing the usage)."""
  with config_errors_reported():
    try:
      rest = flags.FLAGS(argv)
    except flags.Error as e:
      _exit_with(f'{e} (pass --helpfull to see the flags)')
    except SystemExit as e:
      if e.code == 1 and _asks_for_help(argv):
        sys.stdout.flush()
        sys.exit(0)
      raise
    for name in list(flags.FLAGS):
      # ml_collections keeps a config file's load error in a placeholder
      # value that raises it on first use; raise it now.
      load_error = getattr(flags.FLAGS[name].value, '__dict__', {}).get(
          '_error')
      if isinstance(load_error, BaseException):
        missing = (_config_file_not_found(flags.FLAGS[name])
                   if isinstance(load_error, OSError) else None)
        if missing is not None:
          _exit_with(f'config file not found: {missing} (--{name})')
        raise load_error
  return rest


def run(main: Callable[[list[str]], int | None]) -> None:
  """``absl.app.run(main)`` where user errors end in one ``error:`` line.

  Args:
    main: the tool's ``main(argv)``; its return value is the exit status.
  """

  def guarded(argv):
    from msrcnn_jax import console  # pylint: disable=g-import-not-at-top
    console.configure_logging()
    try:
      return main(argv)
    except UserError as e:
      _exit_with(str(e))
    except app.UsageError as e:
      _exit_with(f'{e} (pass --help to see the usage)')

  app.run(guarded, flags_parser=_parse_flags)
