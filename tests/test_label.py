"""`python -m aopsam_jax.label`: 1 vs 2 processes, 1 vs 8 devices, SIGKILL + resume,
bad images, pycocotools round trip.

A small random bundle (vit_tiny_test SAM, a small UNTRAINED predictor with head
bias 0, mask filters off, as in test_pipeline.py) labels five tiny crops of
the sample image in two folders plus one file that is not an image.  Every
run is a subprocess of the real command; they share a persistent compilation
cache (the per-device program is the same in all of them).  The reference is
the uninterrupted single-process, single-device run; the others must produce
byte-identical results.json / images.json / errors.json.
"""

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
from PIL import Image
from pycocotools import mask as coco_mask
from pycocotools.coco import COCO

from aopsam_jax import label_store
from aopsam_jax.aop import bundle as bundle_lib
from aopsam_jax.aop import pipeline
from aopsam_jax.aop.prompt_predictor import PromptPredictorConfig
from aopsam_jax.sam.image_io import load_image, sample_image_path
from tests.subprocess_helpers import free_port

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CFG = pipeline.AsfConfig(k_coarse=6, k_fine=2, peak_kernel=7, pred_iou_thresh=0.0,
                         stability_score_thresh=0.0, stability_score_offset=1.0,
                         abs_threshold=0.0, rel_threshold=0.0, fine_abs_threshold=0.0,
                         fine_rel_threshold=0.0, max_masks=8, nms_thresh=0.9)
PP = PromptPredictorConfig(img_channels=(8, 16, 32), embed_proj=32, hidden=32, dec_channels=(16, 8),
                           head_bias=0.0)
# With a random SAM the CLI would apply its permissive random-init filters; pin ours.
ASF_FLAGS = ["--asf", "pred_iou_thresh=0.0", "--asf", "stability_score_thresh=0.0",
             "--asf", "stability_score_offset=1.0"]
OUTPUTS = ("results.json", "images.json", "errors.json")


def make_bundle(path):
  b = bundle_lib.random_bundle("vit_tiny_test", seed=0, predictor_cfg=PP, asf_cfg=CFG)
  bundle_lib.save_bundle(str(path), b.sam, b.predictor, CFG,
                         random_init={"model": "vit_tiny_test", "seed": 0})


def make_images(root):
  img = load_image(sample_image_path())
  os.makedirs(root / "sub", exist_ok=True)
  for i in range(5):
    h, w = 40 + 9 * i, 64 - 5 * i
    crop = img[30 * i:30 * i + h, 50 * i:50 * i + w]
    Image.fromarray(crop).save(root / ("sub" if i % 2 else ".") / f"im{i}.png")
  (root / "broken.jpg").write_bytes(b"\xff\xd8\xff not really a jpeg")


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
  tmp = tmp_path_factory.mktemp("label")
  make_bundle(tmp / "bundle")
  make_images(tmp / "imgs")
  return tmp


def _cmd(tmp, out, *extra):
  return [sys.executable, "-m", "aopsam_jax.label", str(tmp / "imgs"), "--out", str(out),
          "--bundle", str(tmp / "bundle"), "--batch", "2", "--no-progress", *ASF_FLAGS, *extra]


def _env(tmp, devices=1):
  # The native CPU attention runs on a single device only: every run here uses
  # XLA's, so that 1, 8 devices and 2 processes run the same arithmetic
  # (byte-identical outputs).
  return dict(os.environ, PYTHONPATH=REPO,
              XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}",
              AOPSAM_COMPILE_CACHE=str(tmp / "jax_cache"), AOPSAM_CPU_KERNELS="off")


def _run(tmp, out, devices=1, *extra):
  p = subprocess.run(_cmd(tmp, out, *extra), env=_env(tmp, devices), cwd=REPO,
                     capture_output=True, text=True, timeout=900)
  return p.returncode, p.stdout + p.stderr


def _outputs(out):
  return {name: (out / name).read_bytes() for name in OUTPUTS}


@pytest.fixture(scope="module")
def reference(setup):
  out = setup / "ref"
  rc, log = _run(setup, out)
  assert rc == 1, log[-3000:]  # the broken file makes the run "failed work"
  return out


def test_reference_run_loads_in_pycocotools(reference):
  errors = json.loads((reference / "errors.json").read_text())
  assert [e["file_name"] for e in errors] == ["broken.jpg"]
  coco = COCO(str(reference / "images.json"))
  names = sorted(im["file_name"] for im in coco.dataset["images"])
  assert names == ["im0.png", "im2.png", "im4.png", "sub/im1.png", "sub/im3.png"]
  results = json.loads((reference / "results.json").read_text())
  assert len(results) >= 5
  dt = coco.loadRes(str(reference / "results.json"))
  assert len(dt.getAnnIds()) == len(results)
  by_id = {im["id"]: im for im in coco.dataset["images"]}
  for r in results:
    im = by_id[r["image_id"]]
    assert r["file_name"] == im["file_name"]
    rle = dict(r["segmentation"], counts=r["segmentation"]["counts"].encode())
    m = coco_mask.decode(rle)
    assert m.shape == (im["height"], im["width"])
    assert int(m.sum()) == r["area"] == int(coco_mask.area(rle))
    if r["area"]:
      np.testing.assert_allclose(coco_mask.toBbox(rle), r["bbox"], atol=1)
    assert r["score"] == r["predicted_iou"] and len(r["point_coords"]) == 1
  stats = json.loads((reference / "stats_p00000.json").read_text())
  assert stats["images"] == 5 and stats["errors"] == 1


def test_eight_devices_same_results(setup, reference):
  out = setup / "dev8"
  rc, log = _run(setup, out, 8)
  assert rc == 1, log[-3000:]
  assert json.loads((out / "stats_p00000.json").read_text())["local_devices"] == 8
  assert _outputs(out) == _outputs(reference)


def test_two_processes_same_results(setup, reference):
  out = setup / "proc2"
  port = free_port()
  procs = [subprocess.Popen(_cmd(setup, out, "--coordinator_address", f"localhost:{port}",
                                 "--num_processes", "2", "--process_id", str(i)),
                            env=_env(setup), cwd=REPO, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True) for i in range(2)]
  logs = [p.communicate(timeout=900)[0] for p in procs]
  both = "\n".join(f"--- process {i}:\n{log[-2500:]}" for i, log in enumerate(logs))
  # process 0 reports the merged errors; process 1 only its own share's
  assert procs[0].returncode == 1, both
  assert procs[1].returncode in (0, 1), both
  stats = [json.loads((out / f"stats_p{i:05d}.json").read_text()) for i in range(2)]
  assert [s["images"] + s["errors"] for s in stats] == [3, 3]
  assert _outputs(out) == _outputs(reference)


def test_sigkill_and_resume_same_results(setup, reference):
  out = setup / "killed"
  cmd = _cmd(setup, out, "--flush-every", "1")
  p = subprocess.Popen(cmd, env=_env(setup), cwd=REPO, stdout=subprocess.DEVNULL,
                       stderr=subprocess.DEVNULL)
  shards = out / "shards"
  t0 = time.time()
  while p.poll() is None and time.time() - t0 < 600:
    if shards.is_dir() and any(label_store.SHARD_RE.fullmatch(f) for f in os.listdir(shards)):
      break
    time.sleep(0.02)
  assert p.poll() is None, "run finished before it could be killed"
  p.send_signal(signal.SIGKILL)
  p.wait()
  assert not (out / "results.json").exists()
  n_done = sum(len(json.load(open(shards / f))["entries"]) for f in os.listdir(shards)
               if label_store.SHARD_RE.fullmatch(f))
  assert 1 <= n_done < 6
  rc, log = _run(setup, out, 1, "--flush-every", "1")
  assert rc == 1, log[-3000:]
  assert _outputs(out) == _outputs(reference)


def test_rerun_of_a_finished_run_does_nothing(setup, reference):
  before = _outputs(reference)
  rc, log = _run(setup, reference)
  assert rc == 1 and "no image left to label" in log, log[-3000:]  # the broken file stays failed
  assert _outputs(reference) == before


def test_changed_settings_refuse_to_mix(setup, reference):
  out = setup / "ref"
  rc, log = _run(setup, out, 1, "--asf", "max_masks=4")
  assert rc == 2 and "use another --out" in log


def test_usage_errors_before_loading(tmp_path, capsys):
  from aopsam_jax import label
  assert label.main([str(tmp_path / "nope"), "--out", str(tmp_path / "o")]) == 2
  assert "nope" in capsys.readouterr().err
  assert label.main([str(tmp_path), "--out", str(tmp_path / "o"), "--process_id", "1"]) == 2
  assert "--coordinator_address" in capsys.readouterr().err
  assert label.main([str(tmp_path), "--out", str(tmp_path / "o"), "--asf", "nope=1"]) == 2
  assert "nope" in capsys.readouterr().err
  assert not (tmp_path / "o").exists()


def test_out_inside_the_input_folder_is_not_walked(tmp_path):
  """`label photos --out photos/labels --overlays`: the overlays of one run are
  not inputs of the next (the re-run would see other inputs and stop)."""
  root = tmp_path / "photos"
  (root / "sub").mkdir(parents=True)
  (root / "labels" / "overlays").mkdir(parents=True)
  for path in (root / "a.png", root / "sub" / "b.png", root / "labels" / "overlays" / "1_a.png"):
    Image.fromarray(np.zeros((4, 5, 3), np.uint8)).save(path)
  names = lambda out: [it.file_name for it in label_store.collect_items([str(root)], out)]  # noqa: E731
  assert names(str(root / "labels")) == ["a.png", "sub/b.png"]
  assert names(str(root / "labels") + "/") == ["a.png", "sub/b.png"]
  assert names(None) == ["a.png", "labels/overlays/1_a.png", "sub/b.png"]


def test_coco_json_inputs(tmp_path):
  (tmp_path / "images").mkdir()
  Image.fromarray(np.zeros((4, 5, 3), np.uint8)).save(tmp_path / "images" / "a.png")
  ann = {"images": [{"id": 7, "file_name": "a.png", "width": 5, "height": 4},
                    {"id": 3, "file_name": "missing.png", "width": 5, "height": 4}]}
  (tmp_path / "ann.json").write_text(json.dumps(ann))
  items = label_store.collect_items([str(tmp_path / "ann.json"), str(tmp_path / "images")])
  assert [(it.image_id, it.file_name) for it in items] == [(3, "missing.png"), (7, "a.png")]
  assert items[1].path == str(tmp_path / "images" / "a.png")
  # default image root: beside the json, then images/
  items = label_store.collect_items([str(tmp_path / "ann.json")])
  assert items[1].path == str(tmp_path / "images" / "a.png")
  shares = [label_store.assigned(items, i, 2) for i in range(2)]
  assert [[it.image_id for it in s] for s in shares] == [[3], [7]]
