"""errors: a user's mistake ends a command with `error: <message>` on stderr and exit status 2, no
traceback; any other exception keeps its traceback. The package's user-error types are `UserError`s
that still are what callers caught before, and every user-facing command wraps its `main`."""

import ast
import os
import subprocess
import sys

import pytest

from jmmshap import catalog, checkpoints, config_checks, errors, predictor, tokenizer, workdir
from jmmshap.models import hf

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _absl_command(raised: str) -> subprocess.CompletedProcess:
  """A minimal absl program whose main raises `raised`, run as a user runs train.py."""
  program = ("from absl import app\n"
             "from jmmshap import errors\n"
             "def main(argv):\n"
             "  print('working')\n"
             f"  raise {raised}\n"
             "app.run(errors.exit_on_user_error(main))\n")
  return subprocess.run([sys.executable, "-c", program], cwd=REPO, capture_output=True, text=True,
                        timeout=120, check=False)


def test_a_user_error_is_one_line_on_stderr_and_exit_status_2():
  result = _absl_command("errors.UserError('batch_size=-5: must be a positive integer.')")
  assert result.returncode == 2
  assert result.stderr == "error: batch_size=-5: must be a positive integer.\n"
  assert result.stdout == "working\n"


def test_an_unexpected_exception_keeps_its_traceback_and_is_not_called_a_user_error():
  result = _absl_command("RuntimeError('a bug')")
  assert result.returncode == 1
  assert "Traceback (most recent call last)" in result.stderr
  assert result.stderr.endswith("RuntimeError: a bug\n")
  assert "error: " not in result.stderr


class _Refused(ValueError, errors.UserError):
  pass


def test_the_wrapper_passes_results_and_other_exceptions_through_and_prints_notes(capsys):
  assert errors.exit_on_user_error(lambda x, y=1: x + y)(2, y=3) == 5

  def bug():
    raise KeyError("k")

  with pytest.raises(KeyError):
    errors.exit_on_user_error(bug)()
  assert capsys.readouterr().err == ""

  def refused():
    error = _Refused("line 3: missing image file")
    error.add_note("(set on_bad_row=skip to skip it)")
    raise error

  with pytest.raises(SystemExit) as exit_info:
    errors.exit_on_user_error(refused)()
  assert exit_info.value.code == errors.EXIT_STATUS == 2
  assert capsys.readouterr().err == ("error: line 3: missing image file\n"
                                     "(set on_bad_row=skip to skip it)\n")


@pytest.mark.parametrize("error_type, base", [
    (config_checks.ConfigError, ValueError),
    (catalog.BadRowError, ValueError),
    (catalog.CsvFormatError, ValueError),
    (predictor.WorkdirNotReady, RuntimeError),
    (predictor.CannotPredict, ValueError),
    (workdir.StageNotTrained, FileNotFoundError),
    (workdir.StaleStageError, ValueError),
    (workdir.WorkdirBusy, RuntimeError),
    (checkpoints.CheckpointMismatchError, ValueError),
    (hf.CheckpointError, ValueError),
    (tokenizer.TokenizerNotFound, FileNotFoundError),
])
def test_the_packages_user_errors_are_user_errors_and_keep_their_base(error_type, base):
  assert issubclass(error_type, errors.UserError) and issubclass(error_type, base)


# Scripts for developers (benchmarks, the mutation check, the multi-process stress run) may show
# tracebacks; every other command a user runs reports user errors as one line.
_DEVELOPER_SCRIPTS = ("mutation_check.py", "stress_multiprocess.py")


def _main_block(path: str) -> str | None:
  """The source of a file's `if __name__ == "__main__":` block; None for a module without one."""
  with open(os.path.join(REPO, path)) as f:
    tree = ast.parse(f.read())
  for node in tree.body:
    if (isinstance(node, ast.If) and isinstance(node.test, ast.Compare)
        and isinstance(node.test.left, ast.Name) and node.test.left.id == "__name__"):
      return ast.unparse(node)
  return None


def _commands() -> list[str]:
  names = sorted(os.listdir(os.path.join(REPO, "scripts")))
  scripts = [os.path.join("scripts", name) for name in names if name.endswith(".py")
             and not name.startswith("bench_") and name not in _DEVELOPER_SCRIPTS]
  return ["train.py", "predict.py", *(path for path in scripts if _main_block(path) is not None)]


def test_the_user_facing_commands_are_found():
  assert {"scripts/toyshop_products.py", "scripts/make_catalogue.py", "scripts/eval_options.py",
          "scripts/baselines.py"} <= set(_commands())


@pytest.mark.parametrize("command", _commands())
def test_every_user_facing_command_wraps_its_main(command):
  assert "errors.exit_on_user_error(main)" in _main_block(command), (
      f"{command}: call main through errors.exit_on_user_error, e.g. "
      "app.run(errors.exit_on_user_error(main))")
