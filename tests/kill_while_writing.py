"""train.py, killed with SIGKILL in the middle of writing one output: what a crash at that moment
leaves on disk (not a test module itself).

  python tests/kill_while_writing.py STAGE/FILE train.py-flags...

The output's bytes are written to its temporary file, then the process kills itself before the
rename that would make the file final.
"""

import os
import signal
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

# pylint: disable=wrong-import-position
from absl import app

import train
from jmmshap import workdir

_TARGET = sys.argv.pop(1)
_write_atomically = workdir.write_atomically


def _write_then_die(target: str, write) -> None:
  if target.endswith(os.sep + _TARGET):
    root, extension = os.path.splitext(target)
    write(f"{root}.partial-{os.getpid()}{extension}")
    os.kill(os.getpid(), signal.SIGKILL)
  _write_atomically(target, write)


workdir.write_atomically = _write_then_die

if __name__ == "__main__":
  app.run(train.main)
