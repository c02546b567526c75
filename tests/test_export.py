"""`python -m aopsam_jax.export` round trip: the serialised program, run by
`exported_runner.py` in a process that never imports aopsam_jax or flax, gives
the same outputs as before serialisation.

Weights as arguments: bit-identical to `pipeline.segment_jit` (the same
program).  Weights embedded: bit-identical to the same `Exported` called
before serialisation; against `segment_jit` only close (XLA constant-folds
some weight arithmetic when the weights are constants: ~1e-8 differences)."""

import json
import os
import re
import subprocess
import sys
import zipfile

import numpy as np
import pytest

from aopsam_jax import export
from aopsam_jax.aop import bundle as bundle_lib
from aopsam_jax.aop import pipeline
from aopsam_jax.sam import modeling
from aopsam_jax.sam.image_io import load_image, sample_image_path
from tests.test_label import ASF_FLAGS, CFG, make_bundle

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RUNNER = os.path.join(REPO, "aopsam_jax", "exported_runner.py")

DRIVER = """
import importlib.util, sys, numpy as np
spec = importlib.util.spec_from_file_location("exported_runner", sys.argv[1])
runner = importlib.util.module_from_spec(spec); spec.loader.exec_module(runner)
inp = np.load(sys.argv[2])
res = {}
for i, path in enumerate(sys.argv[3:]):
  prog = runner.load(path)
  out = prog(inp["padded"], inp["input_hw"], inp["original_hw"])
  res.update({f"{i}/{k}": v for k, v in out.items()})
  if i == 0:  # the runner's own resize + pad equals the library's
    p, ih, oh = runner.prepare(inp["image"], prog.img_size)
    res.update(prep_padded=p, prep_input_hw=ih, prep_original_hw=oh)
bad = sorted(m for m in sys.modules if m.split(".")[0] in ("aopsam_jax", "flax"))
assert not bad, bad
np.savez(sys.argv[2] + ".out.npz", **res)
"""


@pytest.fixture(scope="module")
def artefacts(tmp_path_factory):
  """(folder, [embedded artefact, arguments artefact], the embedded `Exported`)."""
  tmp = tmp_path_factory.mktemp("export")
  make_bundle(tmp / "bundle")
  b = bundle_lib.load_bundle(str(tmp / "bundle"), quiet=True)
  exp, _ = export.export_pipeline(b.model, CFG, 2, ("cpu", "cuda"), embed_weights=True)
  paths = [str(tmp / "prog_embedded.bin"), str(tmp / "prog_arguments.bin")]
  export.write_artefact(paths[0], exp, None, {"format": "aopsam_jax.exported", "batch": 2,
                                              "img_size": CFG.img_size, "weights": "embedded"})
  argv = ["--bundle", str(tmp / "bundle"), "--out", paths[1], "--batch", "2",
          "--weights", "arguments", "--platforms", "cpu,cuda", *ASF_FLAGS]
  assert export.main(argv) == 0
  # a second run refuses to replace the artefact (exit 2, nothing loaded), unless --overwrite
  before = os.path.getmtime(paths[1])
  assert export.main(argv) == 2 and os.path.getmtime(paths[1]) == before
  return tmp, paths, exp


def test_round_trip_identical(artefacts):
  tmp, paths, exp_embedded = artefacts
  img = load_image(sample_image_path())
  imgs = [img, np.ascontiguousarray(img[:150, :230])]
  inps = [pipeline.prepare(x) for x in imgs]
  batch = {k: np.stack([getattr(i, k) for i in inps]) for k in ("padded", "input_hw", "original_hw")}
  np.savez(tmp / "inputs.npz", image=imgs[1], **batch)
  driver = tmp / "driver.py"
  driver.write_text(DRIVER)
  env = dict(os.environ, PYTHONPATH="")  # no repo on the path: the model code is unreachable
  p = subprocess.run([sys.executable, str(driver), RUNNER, str(tmp / "inputs.npz"), *paths],
                     env=env, cwd=str(tmp), capture_output=True, text=True, timeout=900)
  assert p.returncode == 0, p.stderr[-3000:]
  got = np.load(str(tmp / "inputs.npz") + ".out.npz")

  b = bundle_lib.load_bundle(str(tmp / "bundle"), quiet=True)
  with modeling.portable_attention(b.model):  # the attention the artefact was traced with
    ref = pipeline.segment_jit(b.model, batch["padded"], batch["input_hw"], batch["original_hw"],
                               CFG)
  ref = {k: np.asarray(v) for k, v in ref.items()}
  assert ref["valid"].any()
  before = {k: np.asarray(v) for k, v in
            exp_embedded.call(batch["padded"], batch["input_hw"], batch["original_hw"]).items()}
  for i, (mode, exact) in enumerate((("embedded", before), ("arguments", ref))):
    keys = [k.split("/", 1)[1] for k in got.files if k.startswith(f"{i}/")]
    assert {"low_res_logits", "iou", "valid", "boxes", "points"} <= set(keys)
    for k in keys:
      np.testing.assert_array_equal(got[f"{i}/{k}"], exact[k], err_msg=f"{mode}: {k}")
      np.testing.assert_allclose(got[f"{i}/{k}"], ref[k], rtol=1e-5, atol=1e-5, err_msg=k)
  np.testing.assert_array_equal(got["prep_padded"], inps[1].padded)
  np.testing.assert_array_equal(got["prep_input_hw"], inps[1].input_hw)
  np.testing.assert_array_equal(got["prep_original_hw"], inps[1].original_hw)


def test_artefact_metadata(artefacts):
  _, paths, _ = artefacts
  with zipfile.ZipFile(paths[1]) as z:
    meta = json.loads(z.read("meta.json"))
    names = set(z.namelist())
  assert meta["platforms"] == ["cpu", "cuda"] and meta["batch"] == 2
  assert meta["weights"] == "arguments" and "weights.npz" in names
  assert meta["random_sam"] is True and meta["asf"]["max_masks"] == CFG.max_masks
  with zipfile.ZipFile(paths[0]) as z:
    assert "weights.npz" not in z.namelist()


def test_runner_command_line(artefacts, tmp_path):
  """`python exported_runner.py PROG IMAGE` alone (no aopsam_jax on the path):
  prints the masks and says the weights are random; a file that is not an
  artefact, a missing image or a wrong argument count is one line, no traceback."""
  _, paths, _ = artefacts
  env = dict(os.environ, PYTHONPATH="")

  def run(*args):
    return subprocess.run([sys.executable, RUNNER, *map(str, args)], env=env, cwd=str(tmp_path),
                          capture_output=True, text=True, timeout=900)
  p = run(paths[1], sample_image_path())
  assert p.returncode == 0, p.stderr[-3000:]
  assert re.fullmatch(r"\d+ masks; predicted IoU \[[0-9., -]*\]; boxes XYXY \[.*\]\n", p.stdout)
  assert "RANDOM-INIT" in p.stderr
  (tmp_path / "notes.bin").write_text("not a program")
  for args, named, status in (((tmp_path / "notes.bin", sample_image_path()), "notes.bin", 1),
                              ((paths[1], tmp_path / "missing.jpg"), "missing.jpg", 1),
                              ((paths[1],), "usage", 2)):
    p = run(*args)
    lines = p.stderr.strip().splitlines()
    assert p.returncode == status and len(lines) == 1 and named in lines[0], p.stderr[-2000:]
