"""benchmarks/device_check.sh --smoke: every step of the accelerator check at toy sizes on CPU.

Checks that the script runs end to end and that its report holds real
measurements: parity numbers within float32 bounds (the official PyTorch
model is the reference) and a timing for every step, none skipped or failed.
"""

from __future__ import annotations

import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_device_check_smoke(tmp_path):  # ~40 s on 2 cores: in the default run (issue #14's evidence)
  out = tmp_path / "device_smoke.md"
  env = dict(os.environ, PYTHON=sys.executable, AOPSAM_SITE=str(tmp_path / "site"),
             OUT=str(tmp_path))
  proc = subprocess.run(["bash", os.path.join(ROOT, "benchmarks", "device_check.sh"), "--smoke",
                         "--out", str(out)], cwd=ROOT, env=env, capture_output=True, text=True,
                        timeout=600)
  assert proc.returncode == 0, proc.stderr[-3000:]
  text = out.read_text()
  import json
  data = json.loads((tmp_path / "device_check.json").read_text())
  assert "skipped" not in text and "error" not in text, text
  for p in data["parity"]:
    assert p["emb"] < 1e-5 and p["low"] < 1e-5 and p["iou"] < 1e-5, p
  assert {p["impl"].split()[0] for p in data["parity"]} == {"chunked", "xla"}
  whats = [r["what"] for r in data["rows"]]
  for step in ("encoder (chunked)", "encoder (xla)", "1 prompt(s) -> masks (orig. size)",
               "AoP-SAM end to end", "AoP-SAM end to end, ASF stages as one loop (prompt_chunk 8)",
               "AMG_S (2x2 grid)", "train step (online embeddings)"):
    assert step in whats, (step, whats)
  assert all(r["median_s"] > 0 and r["runs"] >= 1 for r in data["rows"])
  assert "matmul 256^3 float32" in text
