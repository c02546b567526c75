"""`python -m aopsam_jax.segment` with messy folders and argument mistakes (real CLI, subprocess).

Bad files are reported in one line each and skipped, the rest is written, the
run ends with a summary and exit status 1; inputs with the same stem never
overwrite each other; argument mistakes are one line, exit status 2, before
jax is even imported (so before any model work); the overlay of a 24 MP photo
stays within a bounded memory.
"""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from aopsam_jax import segment
from aopsam_jax.sam import visualize

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HEAVY_MODULES = {"jax", "jaxlib", "flax", "torch", "tensorflow", "matplotlib"}


def run_cli(args, *, importtime=False, timeout=300):
  env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
  cmd = [sys.executable] + (["-X", "importtime"] if importtime else []) + \
      ["-m", "aopsam_jax.segment"] + [str(a) for a in args]
  return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env, cwd=ROOT)


def split_stderr(stderr):
  """(imported top-level modules, other lines) of a `-X importtime` run's stderr."""
  mods, lines = set(), []
  for line in stderr.splitlines():
    if line.startswith("import time:"):
      mods.add(line.rsplit("|", 1)[-1].strip().split(".")[0])
    elif line.strip():
      lines.append(line)
  return mods, lines


def _image(path, hw=(48, 64), seed=0):
  rng = np.random.default_rng(seed)
  Image.fromarray(rng.integers(0, 255, (*hw, 3), dtype=np.uint8)).save(path)


@pytest.fixture(scope="module")
def messy(tmp_path_factory):
  """A folder pair with bad files and same-stem images, segmented once."""
  root = tmp_path_factory.mktemp("messy")
  a, b = root / "in" / "a", root / "in" / "b"
  a.mkdir(parents=True)
  b.mkdir()
  _image(a / "photo.jpg", seed=1)
  _image(b / "photo.jpg", (40, 30), seed=2)
  _image(a / "pic.jpg", seed=3)  # same size as a/photo.jpg: one compilation fewer
  _image(a / "pic.png", seed=4)
  (a / "empty.png").write_bytes(b"")
  (a / "notes.png").write_text("this is text, not a picture\n")
  _image(root / "full.jpg", (200, 300), seed=5)
  data = (root / "full.jpg").read_bytes()
  (a / "cut.jpg").write_bytes(data[:len(data) // 2])
  os.symlink("loop.png", a / "loop.png")
  out = root / "out"
  args = [a, b, "--model-type", "vit_tiny_test", "--mode", "prompt", "--point", "10,10",
          "--out", out]
  proc = run_cli(args)
  return {"root": root, "out": out, "proc": proc, "args": args}


def test_bad_files_are_skipped_and_summarised(messy):
  proc, out = messy["proc"], messy["out"]
  assert proc.returncode == 1, proc.stderr
  lines = proc.stderr.splitlines()
  bad = {"empty.png": "empty file", "notes.png": "not an image", "cut.jpg": "cannot decode",
         "loop.png": "symbolic link"}
  for name, why in bad.items():
    hits = [ln for ln in lines if ln.startswith("skipped ") and name in ln]
    assert len(hits) == 1, (name, proc.stderr)
    assert why in hits[0], hits[0]
  assert "Traceback" not in proc.stderr
  summary = [ln for ln in lines if ln.startswith("segment: ")]
  assert summary and "4 image(s) written" in summary[-1] and "4 failed" in summary[-1]
  # the summary lists every failure once more, after the run
  tail = lines[lines.index(summary[-1]) + 1:]
  assert sorted(n for n in bad for ln in tail if n in ln) == sorted(bad)
  for stem in ("a/photo", "b/photo", "a/pic_jpg", "a/pic_png"):
    assert (out / f"{stem}.json").exists() and (out / f"{stem}_overlay.png").exists(), stem
  assert not list(out.rglob("*.partial"))
  assert not (out / "a" / "empty.json").exists()


def test_same_stem_inputs_do_not_overwrite_each_other(messy):
  out = messy["out"]
  # each JSON describes its own image: its size, and its index in the input order
  # (a/ sorted: cut, empty, loop, notes, photo.jpg, pic.jpg, pic.png; then b/photo.jpg)
  for stem, hw, image_id in (("a/photo", (48, 64), 4), ("a/pic_jpg", (48, 64), 5),
                             ("a/pic_png", (48, 64), 6), ("b/photo", (40, 30), 7)):
    res = json.loads((out / f"{stem}.json").read_text())
    assert res and res[0]["segmentation"]["size"] == list(hw), stem
    assert {r["image_id"] for r in res} == {image_id}, stem


def test_existing_results_need_overwrite(messy):
  proc = run_cli(messy["args"], importtime=True)
  mods, lines = split_stderr(proc.stderr)
  assert proc.returncode == 2 and len(lines) == 1, proc.stderr
  assert "--overwrite" in lines[0] and str(messy["out"]) in lines[0]
  assert not mods & HEAVY_MODULES


def test_skip_existing_finishes_an_interrupted_run(messy):
  """--skip-existing keeps every image that has both results and segments the
  rest; a half-done image (JSON without overlay) is redone; the subfolder of a
  named folder is named in a note."""
  out = messy["out"]
  kept = out / "a" / "photo.json"
  before = kept.stat().st_mtime_ns
  os.remove(out / "b" / "photo.json")
  os.remove(out / "b" / "photo_overlay.png")
  os.remove(out / "a" / "pic_png_overlay.png")
  proc = run_cli(messy["args"] + ["--skip-existing"])
  assert proc.returncode == 1, proc.stderr  # the four bad files still fail
  lines = proc.stderr.splitlines()
  assert any(ln.startswith("--skip-existing: 2 of 8 image(s) already have results")
             for ln in lines), proc.stderr
  summary = [ln for ln in lines if ln.startswith("segment: ")][-1]
  assert "2 image(s) written" in summary and "2 already there (kept)" in summary, summary
  assert "4 failed" in summary
  assert kept.stat().st_mtime_ns == before
  res = json.loads((out / "b" / "photo.json").read_text())
  assert res[0]["segmentation"]["size"] == [40, 30] and {r["image_id"] for r in res} == {7}
  assert (out / "a" / "pic_png_overlay.png").exists()
  assert not list(out.rglob("*.partial"))
  # left: only files a stat shows unusable (empty, looping link): reported, no model built
  for name in ("notes.png", "cut.jpg"):
    os.remove(messy["root"] / "in" / "a" / name)
  proc = run_cli(messy["args"] + ["--skip-existing"], importtime=True)
  mods, lines = split_stderr(proc.stderr)
  assert proc.returncode == 1 and not mods & HEAVY_MODULES, proc.stderr
  assert any(ln.startswith("skipped ") and ln.endswith("empty.png: empty file (0 bytes)")
             for ln in lines), lines
  assert any("loop.png: symbolic link that cannot be followed" in ln for ln in lines), lines
  assert "0 image(s) written" in lines[-3] and "4 already there (kept), 2 failed" in lines[-3]
  # everything but the bad files done: nothing to do, no model built (no jax import)
  for name in ("empty.png", "loop.png"):
    os.remove(messy["root"] / "in" / "a" / name)
  proc = run_cli(messy["args"] + ["--skip-existing"], importtime=True)
  mods, lines = split_stderr(proc.stderr)
  assert proc.returncode == 0, proc.stderr
  assert "4 already there (kept), 0 failed" in proc.stdout and not mods & HEAVY_MODULES


def test_out_in_the_input_folder_does_not_feed_back(tmp_path):
  """`segment photos --out photos`: the overlays written there by a run are not
  inputs of the next one (with everything done, no model is even built)."""
  _image(tmp_path / "a.png")
  (tmp_path / "a.json").write_text("[]")
  _image(tmp_path / "a_overlay.png", seed=7)
  proc = run_cli([tmp_path, "--out", tmp_path, "--skip-existing"], importtime=True)
  mods, lines = split_stderr(proc.stderr)
  assert proc.returncode == 0, proc.stderr
  assert any("1 overlay(s) in --out" in ln for ln in lines), lines
  assert any(ln.startswith("--skip-existing: 1 of 1 image(s)") for ln in lines), lines
  assert "1 already there (kept)" in proc.stdout and not mods & HEAVY_MODULES
  assert segment.drop_own_overlays(["x/a.png", "x/a_overlay.png", "y/b_overlay.png"], "x") == \
      (["x/a.png", "y/b_overlay.png"], 1)


def test_rerun_with_only_unreadable_images_left_builds_no_model(tmp_path):
  """--skip-existing with every image done but a file that is not an image:
  the file is reported from its header alone, no model is built (no jax)."""
  (tmp_path / "in").mkdir()
  _image(tmp_path / "in" / "a.png")
  (tmp_path / "in" / "notes.png").write_text("this is text, not a picture\n")
  out = tmp_path / "out"
  out.mkdir()
  (out / "a.json").write_text("[]")
  _image(out / "a_overlay.png", seed=7)
  proc = run_cli([tmp_path / "in", "--out", out, "--skip-existing"], importtime=True)
  mods, lines = split_stderr(proc.stderr)
  assert proc.returncode == 1, proc.stderr
  assert any(ln.startswith("skipped ") and "notes.png is not an image file PIL can read" in ln
             for ln in lines), lines
  assert "1 already there (kept), 1 failed" in "\n".join(lines) and not mods & HEAVY_MODULES


def test_prompts_outside_the_image_are_named():
  image = np.zeros((449, 640, 3), np.uint8)
  assert segment.prompts_outside(np.array([[10, 10], [640, 449]]), None, image) is None
  assert segment.prompts_outside(None, np.array([0, 0, 640, 449]), image) is None
  text = segment.prompts_outside(np.array([[10, 10], [5000, 5000]]), None, image)
  assert text.startswith("--point 5000,5000 is outside this 640x449 image"), text
  text = segment.prompts_outside(np.array([[449, 640]]), np.array([0, 0, 700, 100]), image)
  assert text.startswith("--point 449,640, --box 0,0,700,100 are outside"), text


def test_subfolders_not_searched_are_named(tmp_path):
  (tmp_path / "in" / "deeper").mkdir(parents=True)
  _image(tmp_path / "in" / "top.png")
  _image(tmp_path / "in" / "deeper" / "below.png")
  subdirs = []
  assert segment.collect_images([str(tmp_path / "in")], subdirs) == [str(tmp_path / "in" / "top.png")]
  assert subdirs == [str(tmp_path / "in" / "deeper")]


def test_output_stems():
  assert segment.output_stems(["x/a.jpg", "x/b.png"]) == ["a", "b"]
  assert segment.output_stems(["a/photo.jpg", "b/photo.jpg"]) == ["a/photo", "b/photo"]
  assert segment.output_stems(["d/photo.jpg", "d/photo.PNG"]) == ["photo_jpg", "photo_png"]
  # a clash left after the extension suffix: numbered in input order, never reused
  assert segment.output_stems(["d/p.jpg", "d/p.png", "d/p_jpg.gif"]) == ["p_jpg", "p_png", "p_jpg_2"]
  assert segment.output_stems(["only.jpg"]) == ["only"]


@pytest.fixture()
def sample(tmp_path):
  p = tmp_path / "img.png"
  _image(p)
  return p


USAGE_CASES = {
    "point_not_numbers": (["--mode", "prompt", "--point", "abc"], "--point"),
    "point_three_numbers": (["--mode", "prompt", "--point", "1,2,3"], "--point"),
    "box_three_numbers": (["--mode", "prompt", "--box", "1,2,3"], "--box"),
    "point_nan": (["--mode", "prompt", "--point", "nan,5"], "--point"),
    "box_inverted": (["--mode", "prompt", "--box", "50,50,10,10"], "--box"),
    "negative_out_of_range": (["--mode", "prompt", "--point", "5,5", "--negative", "5"],
                              "--negative 5"),
    "negative_without_point": (["--mode", "prompt", "--box", "1,1,9,9", "--negative", "0"],
                               "--negative 0"),
    "point_in_aop_mode": (["--point", "5,5"], "--point"),
    "box_in_amg_mode": (["--mode", "amg", "--box", "1,1,9,9"], "--box"),
    "prompt_without_prompt": (["--mode", "prompt"], "--point"),
    "bad_grid": (["--mode", "amg", "--points-per-side", "0"], "--points-per-side"),
    "missing_checkpoint": (["--checkpoint", "nope.safetensors"], "nope.safetensors"),
    "overwrite_and_skip": (["--overwrite", "--skip-existing"], "--skip-existing"),
}


@pytest.mark.parametrize("case", sorted(USAGE_CASES))
def test_argument_mistakes_are_one_line_before_model_work(case, sample, tmp_path):
  args, named = USAGE_CASES[case]
  proc = run_cli([sample, "--out", tmp_path / "out"] + args, importtime=True)
  mods, lines = split_stderr(proc.stderr)
  assert proc.returncode == 2, proc.stderr
  assert len(lines) == 1 and named in lines[0], lines
  assert not mods & HEAVY_MODULES, mods & HEAVY_MODULES
  assert not (tmp_path / "out").exists()


def test_path_mistakes_are_one_line_before_model_work(sample, tmp_path):
  afile = tmp_path / "taken.txt"
  afile.write_text("x")
  cases = [([tmp_path / "missing.jpg", "--out", tmp_path / "o1"], "missing.jpg"),
           ([sample, "--out", afile], "taken.txt"),
           ([sample, "--out", afile / "sub"], "taken.txt/sub")]  # parent is a file: unwritable
  for args, named in cases:
    proc = run_cli(args, importtime=True)
    mods, lines = split_stderr(proc.stderr)
    assert proc.returncode == 2, proc.stderr
    assert len(lines) == 1 and named in lines[0], lines
    assert not mods & HEAVY_MODULES


@pytest.mark.skipif(os.name != "posix" or os.geteuid() == 0,
                    reason="permission bits do not stop root")
def test_read_only_out_dir(sample, tmp_path):
  ro = tmp_path / "ro"
  ro.mkdir()
  ro.chmod(0o555)
  try:
    proc = run_cli([sample, "--out", ro / "out"], importtime=True)
  finally:
    ro.chmod(0o755)
  mods, lines = split_stderr(proc.stderr)
  assert proc.returncode == 2 and len(lines) == 1 and "cannot write" in lines[0]
  assert not mods & HEAVY_MODULES


def test_overlay_blend_is_uint8_and_matches_float_formula():
  rng = np.random.default_rng(0)
  image = rng.integers(0, 256, (30, 40, 3), dtype=np.uint8)
  masks = [rng.random((30, 40)) < 0.5, rng.random((30, 40)) < 0.2]
  got = visualize.overlay_masks(image, masks)
  assert got.dtype == np.uint8 and got.shape == image.shape
  ref = image.astype(np.float64)  # the float formula, larger mask first
  colors = visualize.mask_colors(2).astype(np.float64)
  for i in sorted(range(2), key=lambda i: -int(masks[i].sum())):
    ref[masks[i]] = 0.55 * ref[masks[i]] + 0.45 * colors[i]
  assert np.abs(got.astype(np.float64) - ref).max() <= 2.0
  untouched = ~(masks[0] | masks[1])
  np.testing.assert_array_equal(got[untouched], image[untouched])


def test_overlay_resolution_is_bounded(tmp_path):
  image = np.zeros((900, 5000, 3), np.uint8)
  mask = np.zeros((900, 5000), bool)
  mask[:, 2500:] = True
  path = visualize.save_overlay(str(tmp_path / "o.png"), image, [mask], points=[[4000, 450]])
  w, h = Image.open(path).size
  assert w == visualize.OVERLAY_MAX_SIDE and h <= 900 * w / 5000 + 1
  px = np.asarray(Image.open(path).convert("RGB"))
  # left half black, right half tinted: the mask was scaled with the image
  assert px[h // 2, w // 8].max() < 10 and px[h // 2, w * 5 // 8].max() > 60


@pytest.mark.slow
def test_large_photo_prompt_mode_peak_memory(tmp_path):
  """6000x4000 photo, prompt mode, tiny model: peak RSS of the whole CLI run <= 1.5 GB
  (3.6 GB before the overlay was drawn in uint8 at bounded size)."""
  h, w = 4000, 6000
  y = np.linspace(0, 255, h, dtype=np.float32)[:, None]
  x = np.linspace(0, 255, w, dtype=np.float32)[None, :]
  img = np.stack([np.broadcast_to(y, (h, w)), np.broadcast_to(x, (h, w)),
                  np.full((h, w), 90, np.float32)], -1).astype(np.uint8)
  Image.fromarray(img).save(tmp_path / "big.jpg", quality=80)
  del img, x, y
  code = ("import sys; from aopsam_jax import segment; from aopsam_jax.sysinfo import peak_rss_kb;"
          "rc = segment.main(sys.argv[1:]); print('PEAK_KB', peak_rss_kb()); sys.exit(rc)")
  env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
  proc = subprocess.run([sys.executable, "-c", code, str(tmp_path / "big.jpg"), "--model-type",
                         "vit_tiny_test", "--mode", "prompt", "--point", "3000,2000", "--out",
                         str(tmp_path / "out")], capture_output=True, text=True, timeout=600,
                        env=env, cwd=ROOT)
  assert proc.returncode == 0, proc.stderr[-2000:]
  peak_kb = int(proc.stdout.split("PEAK_KB")[1].split()[0])
  assert peak_kb <= 1.5e9 / 1024, f"peak RSS {peak_kb / 2 ** 20:.2f} GiB"
  res = json.loads((tmp_path / "out" / "big.json").read_text())
  assert res[0]["segmentation"]["size"] == [h, w]
  assert max(Image.open(tmp_path / "out" / "big_overlay.png").size) == visualize.OVERLAY_MAX_SIDE
