"""Preparation at scale without TensorFlow, source fingerprints, resumption,
two processes, the streaming json parser, the bfloat16 embedding cache and
the bounded target memo."""

import io
import json
import logging
import os
import subprocess
import sys
import types

import numpy as np
import pytest
from PIL import Image

from aopsam_jax.data import coco, embedding_cache, pipeline, records
from aopsam_jax.data.json_stream import JsonStream
from tests.test_data import make_synthetic_coco

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# --- streaming json -------------------------------------------------------------

def _random_value(rng, depth=0):
  k = rng.integers(0, 8 if depth < 3 else 5)
  if k == 0:
    return float(rng.normal() * 10.0 ** rng.integers(-8, 9))
  if k == 1:
    return int(rng.integers(-10**12, 10**12))
  if k == 2:
    return "".join(rng.choice(list('ab"\\\u00e9\u4e2d/ \n'), size=rng.integers(0, 12)))
  if k == 3:
    return [None, True, False][rng.integers(0, 3)]
  if k == 4:
    return float(rng.integers(0, 10))
  if k in (5, 6):
    return [_random_value(rng, depth + 1) for _ in range(rng.integers(0, 5))]
  return {f"k{i}": _random_value(rng, depth + 1) for i in range(rng.integers(0, 5))}


def test_json_stream_matches_json_load():
  rng = np.random.default_rng(0)
  for trial in range(40):
    doc = {"images": [_random_value(rng) for _ in range(rng.integers(0, 20))],
           "info": _random_value(rng), "n": float(rng.normal()) * 1e-5,
           "annotations": [_random_value(rng) for _ in range(rng.integers(0, 20))]}
    raw = json.dumps(doc, ensure_ascii=bool(trial % 2), indent=trial % 3 or None).encode()
    for chunk in (1, 2, 5, 64, 1 << 20):
      s = JsonStream(io.BytesIO(raw), chunk=chunk)
      got = {k: (list(s.items()) if k in ("images", "annotations") else s.value())
             for k in s.members()}
      assert got == doc, (trial, chunk)
  for bad in (b'{"images": [1, 2', b'{"images": [1 2]}', b'{"a": tru}'):
    s = JsonStream(io.BytesIO(bad), chunk=3)
    with pytest.raises(json.JSONDecodeError):
      for _ in s.members():
        list(s.items()) if s.is_next("[") else s.value()


def test_parse_is_compact_and_equals_json_load(tmp_path):
  root, _ = make_synthetic_coco(str(tmp_path / "src"), n_images=5)
  path = os.path.join(root, "annotations", "instances.json")
  ref = json.load(open(path))
  c = coco.parse_annotations(path)
  assert c.ids == [im["id"] for im in ref["images"]]
  for iid in c.ids:
    want = [a for a in ref["annotations"] if a["image_id"] == iid]
    got = json.loads(c.annotations_json(iid))
    assert [a["segmentation"] for a in got] == [a["segmentation"] for a in want]
    assert [a["id"] for a in got] == [a["id"] for a in want]
    assert all(isinstance(t, str) for t in c.anns[iid])  # compact text, not dicts
  # annotations before images in the file: same result
  flipped = tmp_path / "flipped.json"
  flipped.write_text(json.dumps({"annotations": ref["annotations"], "images": ref["images"]}))
  c2 = coco.parse_annotations(str(flipped))
  assert c2.ids == c.ids and c2.anns == c.anns


# --- preparation at scale, no TensorFlow ---------------------------------------------

def _tiny_coco(root, n, bad=()):
  """n 6x8 PNG images (all one shared file's bytes, copied), one polygon each."""
  os.makedirs(os.path.join(root, "img"), exist_ok=True)
  os.makedirs(os.path.join(root, "ann"), exist_ok=True)
  buf = io.BytesIO()
  Image.fromarray(np.full((6, 8, 3), 200, np.uint8)).save(buf, "PNG")
  data = buf.getvalue()
  images, anns = [], []
  for i in range(n):
    name = f"{i:07d}.png"
    images.append({"id": i + 1, "file_name": name, "height": 6, "width": 8})
    anns.append({"id": i + 1, "image_id": i + 1, "category_id": 1 + i % 3, "iscrowd": 0,
                 "area": 12.0, "bbox": [1, 1, 4, 3], "segmentation": [[1, 1, 5, 1, 5, 4, 1, 4, i % 2, 2]]})
    if i not in bad:
      with open(os.path.join(root, "img", name), "wb") as f:
        f.write(data)
  with open(os.path.join(root, "ann", "train.json"), "w") as f:
    json.dump({"images": images, "annotations": anns, "categories": []}, f)
  return root


def test_prepare_7500_images_without_tensorflow(tmp_path, monkeypatch):
  """Above the old TFDS failure size (~6.7k): no TensorFlow, no shuffle buffer."""
  monkeypatch.setitem(sys.modules, "tensorflow", None)  # `import tensorflow` now fails
  with pytest.raises(ImportError):
    import tensorflow  # noqa: F401
  n = 7500
  root = _tiny_coco(str(tmp_path / "src"), n, bad=(17, 4000))
  out = records.prepare_split("big", "train", root, "ann/train.json", "img", str(tmp_path / "rec"))
  src = records.RecordSource(out)
  assert len(src) == n - 2
  idx = src.index
  assert len(idx["shards"]) == 8 and idx["skipped_image_ids"] == [18, 4001]
  for i in (0, 16, 17, 3998, 3999, n - 3):
    r = src[i]
    want_id = i + 1 + (i >= 17) + (i >= 3999)
    assert r["image_id"] == want_id and r["file_name"] == f"{want_id - 1:07d}.png"
    (a,) = json.loads(r["annotations"])
    assert a["id"] == want_id and a["segmentation"][0][8] == (want_id - 1) % 2
    assert coco.decode_record(r)["image"].shape == (6, 8, 3)


# --- fingerprints, resumption --------------------------------------------------------

def test_changed_source_is_prepared_again(tmp_path, caplog):
  root, splits = make_synthetic_coco(str(tmp_path / "src"), n_images=4)
  rec = str(tmp_path / "rec")
  d1 = records.prepare("s", root, rec, splits)["train"]
  t1 = os.path.getmtime(os.path.join(d1, "index.json"))
  assert records.prepare("s", root, rec, splits)["train"] == d1  # unchanged: reused
  assert os.path.getmtime(os.path.join(d1, "index.json")) == t1
  # the annotation file changes: one image dropped from the json
  ann = os.path.join(root, "annotations", "instances.json")
  d = json.load(open(ann))
  d["images"] = d["images"][1:]
  d["annotations"] = [a for a in d["annotations"] if a["image_id"] != 100]
  json.dump(d, open(ann, "w"))
  with caplog.at_level(logging.WARNING):
    d2 = records.prepare("s", root, rec, splits)["train"]
  assert d2 != d1 and "changed since it was prepared" in caplog.text and d1 in caplog.text
  src = records.RecordSource(d2)
  assert [src[i]["image_id"] for i in range(len(src))] == [101, 102, 103]
  # an image file changes (its size): prepared again too
  Image.fromarray(np.zeros((160, 120, 3), np.uint8)).save(os.path.join(root, "images", "000101.png"))
  d3 = records.prepare("s", root, rec, splits)["train"]
  assert d3 not in (d1, d2)
  src3 = records.RecordSource(d3)
  r101 = next(src3[i] for i in range(len(src3)) if src3[i]["image_id"] == 101)
  assert not coco.decode_record(r101)["image"].any()  # the new, all-black image


def test_killed_preparation_resumes(tmp_path):
  root = _tiny_coco(str(tmp_path / "src"), 50)
  kw = dict(images_per_shard=16)
  out = records.prepare_split("r", "train", root, "ann/train.json", "img", str(tmp_path / "rec"), **kw)
  ref = [records.RecordSource(out)[i] for i in range(50)]
  # as if killed while writing shard 2: its marker and the index are gone, a temp file is left
  os.remove(os.path.join(out, "index.json"))
  os.remove(os.path.join(out, "records-00002-of-00004.array_record.json"))
  open(os.path.join(out, ".records-00002-of-00004.array_record.dead.tmp"), "w").close()
  t0 = os.path.getmtime(os.path.join(out, "records-00001-of-00004.array_record"))
  assert records.prepare_split("r", "train", root, "ann/train.json", "img",
                               str(tmp_path / "rec"), **kw) == out
  assert os.path.getmtime(os.path.join(out, "records-00001-of-00004.array_record")) == t0
  assert not [f for f in os.listdir(out) if f.endswith(".tmp")]
  src = records.RecordSource(out)
  assert [src[i] for i in range(50)] == ref


# --- two processes --------------------------------------------------------------

def _prepare_main(argv):
  """Subprocess: jax.distributed process argv[1] of 2 prepares the selection."""
  import jax
  import ml_collections
  jax.distributed.initialize(coordinator_address=argv[0], num_processes=2, process_id=int(argv[1]))
  from aopsam_jax.trainer import data_setup
  cfg = ml_collections.ConfigDict(json.loads(argv[2]))
  out = data_setup.prepare_source(cfg, "tiny", "train", process_index=jax.process_index(),
                                  process_count=jax.process_count(),
                                  barrier=data_setup.barrier_fn(jax.process_count()))
  print("PREPARED", out, os.path.expanduser("~"))


def test_two_processes_prepare_in_parallel(tmp_path):
  from tests.subprocess_helpers import free_port
  root = _tiny_coco(str(tmp_path / "src"), 100)
  cfg = {"dir": str(tmp_path / "shared_rec"), "sources": {"tiny": {
      "format": "coco", "dir": root, "splits": {"train": ["ann/train.json", "img"]}}}}
  port = free_port()
  procs = []
  for i in range(2):
    home = tmp_path / f"home{i}"
    home.mkdir()
    env = dict(os.environ, PYTHONPATH=REPO, HOME=str(home),
               XLA_FLAGS="--xla_force_host_platform_device_count=1")
    procs.append(subprocess.Popen(
        [sys.executable, "-c", "import sys; from tests.test_records import _prepare_main; "
         "_prepare_main(sys.argv[1:])", f"localhost:{port}", str(i), json.dumps(cfg)],
        env=env, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT))
  outs = [p.communicate(timeout=300)[0].decode(errors="replace") for p in procs]
  for p, o in zip(procs, outs):
    assert p.returncode == 0, o[-3000:]
  lines = [next(ln for ln in o.splitlines() if ln.startswith("PREPARED")).split() for o in outs]
  assert lines[0][1] == lines[1][1] and lines[0][2] != lines[1][2]  # same dir, different HOMEs
  out = lines[0][1]
  writers = [json.load(open(os.path.join(out, f)))["process"] for f in sorted(os.listdir(out))
             if f.endswith(".array_record.json")]
  assert writers == [0]  # 100 images: one shard of 1024
  # with smaller shards both processes write; records equal a one-process preparation
  ref = records.RecordSource(records.prepare_split("tiny", "train", root, "ann/train.json", "img",
                                                   str(tmp_path / "one")))
  got = records.RecordSource(out)
  assert [got[i] for i in range(len(got))] == [ref[i] for i in range(len(ref))]
  assert not any(os.listdir(tmp_path / f"home{i}") for i in range(2))  # nothing under ~


def test_shards_split_between_processes(tmp_path):
  """Two 'processes' as threads meeting at a real barrier: shard s by process s % 2."""
  import threading
  root = _tiny_coco(str(tmp_path / "src"), 70)
  rec = str(tmp_path / "rec")
  bar = threading.Barrier(2, timeout=120)
  names = [[], []]
  outs, errors = [None, None], []

  def proc(p):
    try:
      outs[p] = records.prepare_split(
          "p", "train", root, "ann/train.json", "img", rec, images_per_shard=16, process_index=p,
          process_count=2, barrier=lambda name: (names[p].append(name), bar.wait()))
    except Exception as e:  # surfaced below
      errors.append(e)
      bar.abort()

  threads = [threading.Thread(target=proc, args=(p,)) for p in range(2)]
  for t in threads:
    t.start()
  for t in threads:
    t.join()
  assert not errors, errors
  assert outs[0] == outs[1] and names[0] == names[1] and len(names[0]) == 2
  writers = [json.load(open(os.path.join(outs[0], f)))["process"]
             for f in sorted(os.listdir(outs[0])) if f.endswith(".array_record.json")]
  assert writers == [0, 1, 0, 1, 0]
  src = records.RecordSource(outs[0])
  assert [src[i]["image_id"] for i in range(len(src))] == list(range(1, 71))


# --- embedding cache -----------------------------------------------------------------

SAM_CFG = types.SimpleNamespace(embed_size=4, prompt_embed_dim=8, img_size=64)


def _fake_encode(padded, hw):
  """Deterministic stand-in for the SAM encoder: values from the pixels."""
  x = padded.astype(np.float32)[0]
  emb = np.broadcast_to(x[:4, :4, :1] / 7.0 + np.arange(8) / 3.0, (4, 4, 8))
  return emb[None], (x[:16, :16] / 255.0 - 0.3)[None]


def test_embedding_cache_bfloat16_sharded(tmp_path):
  from aopsam_jax.trainer import embed_cache
  root = _tiny_coco(str(tmp_path / "src"), 40)
  out = records.prepare_split("c", "train", root, "ann/train.json", "img", str(tmp_path / "rec"),
                              images_per_shard=16)
  src = records.RecordSource(out)
  cache = embed_cache.build_cache(str(tmp_path / "cache"), "e" * 64, "c_train", src, _fake_encode,
                                  SAM_CFG)
  files = sorted(os.listdir(cache.dir))
  assert files.count("meta.json") == 1 and len([f for f in files if f.endswith(".embedding.npy")]) == 3
  for i in (0, 17, 39):
    r = src[i]
    padded, hw, _ = embed_cache.transforms.prepare_image(coco.decode_record(r)["image"], 64)
    want_e, want_s = _fake_encode(padded[None], hw)
    e, s = cache.lookup(r["image_id"])
    assert e.dtype == np.float32 and e.shape == (4, 4, 8) and s.shape == (16, 16, 3)
    # stored as bfloat16: exactly the rounded values, within bf16's 2^-8 relative step
    np.testing.assert_array_equal(e, want_e[0].astype(embedding_cache.BFLOAT16).astype(np.float32))
    np.testing.assert_allclose(s, want_s[0], rtol=2 ** -8, atol=1e-6)
  emb0 = next(f for f in files if f.endswith(".embedding.npy"))
  assert np.load(os.path.join(cache.dir, emb0), mmap_mode="r").dtype == np.uint16
  with pytest.raises(coco.DatasetError, match="not in the embedding cache"):
    cache.lookup(123456)


def test_embedding_cache_refuses_when_disk_is_short(tmp_path, monkeypatch):
  from aopsam_jax.trainer import embed_cache
  root = _tiny_coco(str(tmp_path / "src"), 10)
  src = records.RecordSource(records.prepare_split("c", "train", root, "ann/train.json", "img",
                                                   str(tmp_path / "rec")))
  monkeypatch.setattr(embed_cache, "_free_bytes", lambda p: (1 << 30) + 5000)
  with pytest.raises(embed_cache.CacheTooLarge, match=r"needs 0\.0 GiB .*config.embeddings='online'"):
    embed_cache.build_cache(str(tmp_path / "cache"), "e" * 64, "c_train", src, _fake_encode, SAM_CFG)
  assert not os.path.exists(tmp_path / "cache")  # refused before writing anything


def test_changed_records_get_a_new_cache(tmp_path):
  """Rebuilt records with the old cache kept used to die with a bare KeyError."""
  from aopsam_jax.trainer import embed_cache
  root = _tiny_coco(str(tmp_path / "src"), 12)
  rec, cdir = str(tmp_path / "rec"), str(tmp_path / "cache")
  src1 = records.RecordSource(records.prepare_split("c", "train", root, "ann/train.json", "img", rec))
  c1 = embed_cache.build_cache(cdir, "e" * 64, "c_train", src1, _fake_encode, SAM_CFG)
  ann = os.path.join(root, "ann", "train.json")
  d = json.load(open(ann))
  for im in d["images"]:
    im["id"] += 1000
  for a in d["annotations"]:
    a["image_id"] += 1000
  json.dump(d, open(ann, "w"))
  src2 = records.RecordSource(records.prepare_split("c", "train", root, "ann/train.json", "img", rec))
  c2 = embed_cache.build_cache(cdir, "e" * 64, "c_train", src2, _fake_encode, SAM_CFG)
  assert c2.dir != c1.dir
  e, _ = c2.lookup(src2[0]["image_id"])
  np.testing.assert_array_equal(e, c1.lookup(src1[0]["image_id"])[0])  # same pixels


# --- bounded target memo ---------------------------------------------------------------

def test_target_memo_is_a_bounded_lru():
  m = pipeline.TargetMemo(3)
  calls = []
  get = lambda k: m.get(k, lambda: calls.append(k) or np.full(2, k))
  for k in (1, 2, 3, 1, 4, 2, 1):
    assert get(k)[0] == k
  # 1,2,3 computed; 1 hit; 4 evicts 2 (least recent); 2 recomputed evicts 3; 1 hit
  assert calls == [1, 2, 3, 4, 2] and len(m) == 3
  off = pipeline.TargetMemo(0)
  off.get(1, lambda: calls.append("x")); off.get(1, lambda: calls.append("x"))
  assert calls[-2:] == ["x", "x"] and len(off) == 0
  assert pipeline.memo_capacity(True) == pipeline.DEFAULT_MEMO
  assert pipeline.memo_capacity(False) == 0 and pipeline.memo_capacity(7) == 7


def test_yolo_source_prepared_and_refreshed(tmp_path):
  """A YOLO source converts once per labels/images listing; a changed label file
  gives a new conversion and new records."""
  import ml_collections
  from aopsam_jax.trainer import data_setup
  img, lab = tmp_path / "y" / "images", tmp_path / "y" / "labels"
  img.mkdir(parents=True); lab.mkdir()
  for i in (1, 2):
    Image.fromarray(np.zeros((40, 50, 3), np.uint8)).save(img / f"{i:04d}.jpg")
  (lab / "0001.txt").write_text("0 0.1 0.1 0.5 0.1 0.5 0.5\n")
  cfg = ml_collections.ConfigDict({"dir": str(tmp_path / "rec"), "sources": {"yo": {
      "format": "yolo", "dir": str(tmp_path / "y"), "splits": {"train": ["labels", "images"]}}}})
  d1 = data_setup.prepare_source(cfg, "yo", "train")
  src = records.RecordSource(d1)
  anns = {src[i]["image_id"]: json.loads(src[i]["annotations"]) for i in range(len(src))}
  assert sorted(anns) == [1, 2] and len(anns[1]) == 1 and anns[2] == []
  np.testing.assert_allclose(anns[1][0]["segmentation"][0], [5, 4, 25, 4, 25, 20])
  (lab / "0002.txt").write_text("1 0 0 1 0 1 1\n")
  d2 = data_setup.prepare_source(cfg, "yo", "train")
  assert d2 != d1 and len(os.listdir(tmp_path / "rec" / "yo" / "_converted")) == 2
  src2 = records.RecordSource(d2)
  assert [len(json.loads(src2[i]["annotations"])) for i in range(2)] == [1, 1]
