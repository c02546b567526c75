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
