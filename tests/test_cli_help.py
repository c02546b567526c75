"""Every program's --help documents its exit statuses (0 done, 1 failed work, 2 usage error)."""

import os
import re
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.parametrize("module", ["aopsam_jax.segment", "aopsam_jax.train", "aopsam_jax.evaluate",
                                    "aopsam_jax.bundle", "conversion.convert_sam"])
def test_help_documents_exit_statuses(module):
  env = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
  proc = subprocess.run([sys.executable, "-m", module, "--help"], capture_output=True, text=True,
                        timeout=300, env=env, cwd=REPO)
  # absl (train) ends --help with status 1 by its own convention
  assert proc.returncode == (1 if module == "aopsam_jax.train" else 0), proc.stderr[-2000:]
  text = " ".join(proc.stdout.split())  # argparse re-wraps the lines
  m = re.search(r"Exit status: 0 (.*)", text)
  assert m, text[-1500:]
  rest = m.group(1)
  assert re.search(r"\b1 (when|for)\b", rest) and re.search(r"\b2 (for|when)\b", rest), rest[:400]
  assert "usage error" in rest


def test_warnings_are_one_line(capsys):
  """run_main prints a Python warning as one `prog: warning:` line, without
  the source file and line Python's default format adds."""
  import warnings

  from aopsam_jax.cli import run_main

  def main(argv):
    warnings.warn("weights are RANDOM;\n  masks are meaningless", UserWarning, stacklevel=2)
    return 0
  assert run_main(main, [], "prog") == 0
  err = capsys.readouterr().err
  assert err == "prog: warning: weights are RANDOM; masks are meaningless\n", err


def test_ctrl_c_is_one_line_with_the_resume_hint(capsys):
  from aopsam_jax.cli import run_main

  def main(argv):
    raise KeyboardInterrupt
  assert run_main(main, [], "prog", "add --skip-existing to finish") == 130
  assert capsys.readouterr().err == "prog: interrupted; add --skip-existing to finish\n"
