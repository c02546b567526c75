"""The CLIs' persistent compilation cache (aopsam_jax.compile_cache)."""

from __future__ import annotations

import os
import subprocess
import sys

from aopsam_jax import compile_cache

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_cache_dir_from_environment(monkeypatch, tmp_path):
  monkeypatch.delenv(compile_cache.ENV, raising=False)
  monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
  assert compile_cache.cache_dir() == os.path.join(str(tmp_path), "aopsam_jax", "jax_compile_cache")
  monkeypatch.setenv(compile_cache.ENV, str(tmp_path / "mine"))
  assert compile_cache.cache_dir() == str(tmp_path / "mine")
  for off in ("off", "0", "", "None"):
    monkeypatch.setenv(compile_cache.ENV, off)
    assert compile_cache.cache_dir() is None
    assert compile_cache.setup() is None


def test_flag_turns_it_off(monkeypatch, tmp_path):
  monkeypatch.setenv(compile_cache.ENV, str(tmp_path / "c"))
  assert compile_cache.setup(disabled=True) is None
  assert not (tmp_path / "c").exists()
  assert "compile cache off" in compile_cache.notice("x")


def test_first_call_notice():
  lines = []
  f = compile_cache.announce_first_call(lambda x: x + 1, "the test program", write=lines.append)
  assert f(1) == 2 and f(2) == 3
  assert len(lines) == 2
  assert lines[0].startswith("compiling the test program (")
  assert "the test program: ready after" in lines[1]


def _keys(cache: str) -> set:
  names = os.listdir(cache) if os.path.isdir(cache) else []
  return {f for f in names if "atime" not in f}


def _segment(tmp_path, out: str, cache: str) -> subprocess.CompletedProcess:
  # every program is stored (min 0 s): whether a small one crosses the default
  # 1 s threshold depends on the machine's load
  env = dict(os.environ, **{compile_cache.ENV: cache, compile_cache.MIN_S_ENV: "0"}, PYTHONPATH=ROOT)
  cmd = [sys.executable, "-m", "aopsam_jax.segment", "--mode", "prompt", "--point", "200,150",
         "--model-type", "vit_tiny_test", "--out", str(tmp_path / out)]
  proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0, proc.stderr[-2000:]
  return proc


def test_second_process_loads_the_compiled_programs(tmp_path):
  """Run 1 compiles and writes the programs; run 2, a new process, finds every one
  of them in the cache (no new entry is written) and says where they come from."""
  cache = str(tmp_path / "cache")
  first = _segment(tmp_path, "a", cache)
  keys = _keys(cache)
  big = {k for k in keys if k.startswith(("jit__embed-", "jit__predict-"))}
  assert len(big) == 2, f"the first run wrote {sorted(keys)}"
  assert f"compiling the SAM predictor for random-init vit_tiny_test (first run only; cached in " \
         f"{cache})" in first.stderr
  second = _segment(tmp_path, "b", cache)
  assert _keys(cache) == keys
  for p in (first, second):  # the timings are shown, not asserted (shared machines)
    print([ln for ln in p.stderr.splitlines() if "ready after" in ln])
