"""User errors: their exception type and the command-line entry point.

A user error is a mistake in what the user gave a command: a path, a
dataset, a config or a checkpoint. The code that validates that input raises
``UserError`` (or a subclass: ``data.coco.CocoFormatError``,
``data.image_io.ImageReadError``, ``variables.CheckpointError``,
``convert.mmdet.ConversionError``, ``variables.VariablesMismatchError``,
``ConfigError``) with a message naming the file, id, key, shape or value.

``run(main)`` is the entry point of every command-line tool (``train.py``,
``convert_torch_weights.py``, ``python -m msrcnn_jax.predict`` and
``msrcnn_jax.evaluate``): a user error, a bad flag or a config file that
cannot be loaded ends in one ``error: ...`` line on stderr and exit status
1, without a traceback. Any other exception is a programming error and keeps
its traceback.
"""

from __future__ import annotations

import contextlib
import sys
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


def _exit_with(message: str) -> NoReturn:
  lines = str(message).strip().splitlines() or ['(no message)']
  sys.stdout.flush()
  for line in lines[1:]:
    print(line, file=sys.stderr)
  print(f'error: {lines[0]}', file=sys.stderr)
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


def _parse_flags(argv: Sequence[str]) -> list[str]:
  """absl's flag parsing; bad flags and configs are user errors."""
  with config_errors_reported():
    try:
      rest = flags.FLAGS(argv)
    except flags.Error as e:
      _exit_with(f'{e} (pass --helpfull to see the flags)')
    for name in list(flags.FLAGS):
      # ml_collections keeps a config file's load error in a placeholder
      # value that raises it on first use; raise it now.
      load_error = getattr(flags.FLAGS[name].value, '__dict__', {}).get(
          '_error')
      if isinstance(load_error, BaseException):
        raise load_error
  return rest


def run(main: Callable[[list[str]], int | None]) -> None:
  """``absl.app.run(main)`` where user errors end in one ``error:`` line.

  Args:
    main: the tool's ``main(argv)``; its return value is the exit status.
  """

  def guarded(argv):
    try:
      return main(argv)
    except UserError as e:
      _exit_with(str(e))
    except app.UsageError as e:
      _exit_with(f'{e} (pass --help to see the usage)')

  app.run(guarded, flags_parser=_parse_flags)
