"""Where a benchmark's markdown table goes: the file (benchmarks/results/... unless
--out), and the console."""

from __future__ import annotations

import os


def write_table(text: str, out: str) -> None:
  """Write `text` to `out` (creating its folder), print it and where it went."""
  os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
  with open(out, "w") as f:
    f.write(text)
  print(text)
  print(f"wrote {out}")
