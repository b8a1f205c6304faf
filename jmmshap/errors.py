"""The user's own mistakes, told as one message instead of a traceback.

A `UserError` is a problem the person running a command can fix from its message alone: a config
whose settings cannot work, a bad CSV row or file, a workdir that is unfinished or was built from
other inputs, a checkpoint of another model. The package's error types for these inherit from it
as well as from their usual base (`ValueError`, `RuntimeError`, `FileNotFoundError`), so code that
catches those keeps working. The command-line entry points (train.py, predict.py, the scripts a
user runs) wrap their `main` in `exit_on_user_error`: such an error prints `error: <message>` on
stderr and exits with status 2; any other exception keeps its traceback, since that is a bug to
report. A message is one line, except a list of several problems (a config's), one a line.

In a multi-process run every process that meets the error prints it (a config error: each of
them). One that only process 0 meets, such as a bad row found while it prepares the data, is
printed by process 0; the others then stop when they lose it.

The lowest layer of the package: it imports nothing of it, so every module can raise these.
"""

from __future__ import annotations

import functools
import sys
from collections.abc import Callable
from typing import ParamSpec, TypeVar

EXIT_STATUS = 2  # As argparse's for a bad command line; absl's app.run uses 1 for its flags.

_P = ParamSpec("_P")
_R = TypeVar("_R")


class UserError(Exception):
  """A mistake in what the user gave (config, data, workdir, checkpoint); its message says how
  to put it right."""


def message(error: BaseException) -> str:
  """What the user reads: `error: ` and the error's text, with any notes added to it on the way
  (PEP 678) on the lines after."""
  text = str(error) or type(error).__name__
  return "\n".join([f"error: {text}", *getattr(error, "__notes__", ())])


def exit_on_user_error(main: Callable[_P, _R]) -> Callable[_P, _R]:
  """`main` that turns a `UserError` into `error: <message>` on stderr and exit status 2, without
  a traceback; other exceptions pass unchanged. Wrap at the call,
  `app.run(errors.exit_on_user_error(main))`, so that tests calling `main` still see the exception
  itself."""

  @functools.wraps(main)
  def wrapped(*args: _P.args, **kwargs: _P.kwargs) -> _R:
    try:
      return main(*args, **kwargs)
    except UserError as error:
      print(message(error), file=sys.stderr, flush=True)
      raise SystemExit(EXIT_STATUS) from None

  return wrapped
