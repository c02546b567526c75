"""Every way to name SAM weights (`aopsam_jax.sam.checkpoints`): converted
safetensors, official .pth (no model type given), a Hugging Face folder, and
names downloaded from a local HTTP server on 127.0.0.1 standing in for the
official URL (a complete file, a connection dropped mid-file, no server)."""

from __future__ import annotations

import http.server
import os
import threading

import numpy as np
import pytest

from tests.reference import build_torch_sam, save_official_pth, state_dict_numpy
from tests.test_hf_layout import official_to_hf

import torch  # noqa: E402,F401  (after tests.reference installed the torchvision stand-in)

from aopsam_jax.sam import checkpoints as C  # noqa: E402
from aopsam_jax.sam import params as P  # noqa: E402
from aopsam_jax.sam.config import SAM_CONFIGS  # noqa: E402
from conversion import convert_sam  # noqa: E402


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
  """(official .pth of a random vit_tiny_test, its params converted independently of
  `checkpoints`: the numpy state dict through `params.convert_state_dict`)."""
  sam = build_torch_sam(SAM_CONFIGS["vit_tiny_test"], seed=7)
  d = tmp_path_factory.mktemp("src")
  pth = save_official_pth(sam, str(d / "sam_tiny.pth"))
  sd = state_dict_numpy(sam)
  cfg, ref = P.convert_state_dict(sd, SAM_CONFIGS["vit_tiny_test"])
  return pth, sd, ref


def same(a, b):
  assert set(a) == set(b)
  bad = [k for k in a if not np.array_equal(a[k], b[k])]
  assert not bad, bad[:5]


def test_pth_without_model_type_and_as_assertion(tiny):
  pth, _, ref = tiny
  cfg, flat, desc = C.load_params(pth)
  assert cfg == SAM_CONFIGS["vit_tiny_test"] and desc == "sam_tiny.pth"
  same(flat, ref)
  assert C.load_params(pth, "vit_tiny_test")[0] == cfg  # a matching assertion passes
  with pytest.raises(C.CheckpointError, match="--model-type vit_h given, but the tensor shapes "
                                              "are vit_tiny_test"):
    C.load_params(pth, "vit_h")


def test_converted_safetensors(tiny, tmp_path):
  pth, _, ref = tiny
  out = tmp_path / "tiny.safetensors"
  assert convert_sam.main(["-c", pth, "-o", str(out), "-q"]) == 0
  assert C.is_converted(str(out)) and not C.is_converted(pth)
  cfg, flat, _ = C.load_params(str(out))
  same(flat, ref)
  model = C.load_sam(str(out))
  np.testing.assert_array_equal(np.asarray(model.image_encoder.pos_embed[...]),
                                ref["image_encoder.pos_embed"])


def test_hf_folder(tiny, tmp_path):
  from safetensors.numpy import save_file
  _, sd, ref = tiny
  folder = tmp_path / "sam-vit-tiny"
  folder.mkdir()
  save_file({k: np.ascontiguousarray(v) for k, v in official_to_hf(sd).items()},
            str(folder / "model.safetensors"))
  (folder / "config.json").write_text('{"model_type": "sam"}')
  cfg, flat, _ = C.load_params(str(folder))
  assert cfg == SAM_CONFIGS["vit_tiny_test"]
  same(flat, ref)
  # bf16 weights (safetensors BF16) are read without torch and widened exactly
  import ml_dtypes
  save_file({k: np.ascontiguousarray(v).astype(ml_dtypes.bfloat16)
             for k, v in official_to_hf(sd).items()}, str(folder / "model.safetensors"))
  _, flat16, _ = C.load_params(str(folder))
  for k in ref:
    np.testing.assert_array_equal(flat16[k], ref[k].astype(ml_dtypes.bfloat16).astype(np.float32))


def test_unknown_source_names_the_choices(tmp_path):
  with pytest.raises(C.CheckpointError, match="not a known checkpoint name.*vit_h"):
    C.load_params(str(tmp_path / "nope.pth"))


# --- names: download from a local server ---------------------------------------------


class _Server:
  """Serves `files` {url path: bytes}; paths in `drop` send half the body, then hang up."""

  def __init__(self):
    self.files, self.drop, self.hits = {}, set(), []
    outer = self

    class Handler(http.server.BaseHTTPRequestHandler):
      def do_GET(self):
        outer.hits.append(self.path)
        body = outer.files.get(self.path)
        if body is None:
          self.send_error(404)
          return
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if self.path in outer.drop:
          self.wfile.write(body[:len(body) // 2])
          self.wfile.flush()
          self.connection.shutdown(2)
          return
        self.wfile.write(body)

      def log_message(self, *args):
        pass

    self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/sam"
    threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

  def close(self):
    self.httpd.shutdown()
    self.httpd.server_close()


@pytest.fixture
def server(monkeypatch, tmp_path):
  s = _Server()
  monkeypatch.setenv("AOPSAM_SAM_BASE_URL", s.url)
  monkeypatch.setenv("AOPSAM_CACHE", str(tmp_path / "cache"))
  yield s
  s.close()


def cache_files(tmp_path):
  root = tmp_path / "cache"
  return sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file()) \
      if root.exists() else []


def test_cache_dir_is_documented_xdg(monkeypatch, tmp_path):
  monkeypatch.delenv("AOPSAM_CACHE", raising=False)
  monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
  assert C.cache_dir() == str(tmp_path / "xdg" / "aopsam_jax")
  monkeypatch.setenv("AOPSAM_CACHE", str(tmp_path / "mine"))
  assert C.cache_dir() == str(tmp_path / "mine")
  assert C.cached_path("vit_h").endswith(os.path.join("checkpoints", "sam_vit_h_4b8939.safetensors"))


def test_named_vit_b_downloaded_once_converted_cached(server, tmp_path, capsys):
  """`vit_b` fetched from the (local) official URL: an official-format vit_b file with
  the real key names and shapes (stride-0 tensors keep it a few MB), converted once."""
  from tests.test_pth_reader import official_format_pth
  src = tmp_path / "served.pth"
  official_format_pth(SAM_CONFIGS["vit_b"], str(src), seed=3)
  server.files["/sam/sam_vit_b_01ec64.pth"] = src.read_bytes()
  cfg, flat, desc = C.load_params("vit_b", "vit_b", progress=True)
  assert cfg == SAM_CONFIGS["vit_b"] and desc == "vit_b"
  assert cache_files(tmp_path) == ["checkpoints/sam_vit_b_01ec64.safetensors"]
  assert server.hits == ["/sam/sam_vit_b_01ec64.pth"]
  assert "sam_vit_b_01ec64" in capsys.readouterr().err  # the progress bar names the file
  ref = P.convert_state_dict(C.read_checkpoint(str(src)))[1]
  assert flat["image_encoder.pos_embed"].shape == (1, 64, 64, 768)
  for k in ("image_encoder.pos_embed", "image_encoder.blocks.11.attn.qkv.kernel",
            "mask_decoder.iou_token"):
    np.testing.assert_array_equal(flat[k], ref[k])
  C.load_params("vit_b")  # second time: from the cache, no request
  assert server.hits == ["/sam/sam_vit_b_01ec64.pth"]


def test_dropped_connection_leaves_nothing(server, tmp_path, tiny, monkeypatch, capsys):
  monkeypatch.setitem(C.OFFICIAL_FILES, "vit_tiny_test", "sam_vit_tiny_test.pth")
  monkeypatch.setattr(C, "NAMES", C.NAMES + ("vit_tiny_test",))
  server.files["/sam/sam_vit_tiny_test.pth"] = open(tiny[0], "rb").read()
  server.drop.add("/sam/sam_vit_tiny_test.pth")
  out = tmp_path / "x.safetensors"
  assert convert_sam.main(["-c", "vit_tiny_test", "-o", str(out), "-q"]) == 1
  err = capsys.readouterr().err.strip()
  assert len(err.splitlines()) == 1 and "Traceback" not in err
  assert f"{server.url}/sam_vit_tiny_test.pth" in err and "--checkpoint /path/to/" in err
  assert cache_files(tmp_path) == [] and not out.exists()
  server.drop.clear()  # the next try works and fills the cache
  assert convert_sam.main(["-c", "vit_tiny_test", "-o", str(out), "-q"]) == 0
  same(P.read_converted(str(out))[1], tiny[2])
  assert cache_files(tmp_path) == ["checkpoints/sam_vit_tiny_test.safetensors"]


def test_offline_is_one_line_exit_1(monkeypatch, tmp_path, capsys):
  import socket
  s = socket.socket()
  s.bind(("127.0.0.1", 0))
  port = s.getsockname()[1]
  s.close()  # nothing listens there now
  monkeypatch.setenv("AOPSAM_SAM_BASE_URL", f"http://127.0.0.1:{port}/x")
  monkeypatch.setenv("AOPSAM_CACHE", str(tmp_path / "cache"))
  from aopsam_jax import segment
  rc = segment.main(["--checkpoint", "vit_h", "--out", str(tmp_path / "o")])
  err = capsys.readouterr().err.strip().splitlines()
  assert rc == 1 and "Traceback" not in "\n".join(err)
  line = err[-1]
  assert f"http://127.0.0.1:{port}/x/sam_vit_h_4b8939.pth" in line
  assert "--checkpoint /path/to/sam_vit_h_4b8939.pth" in line
  assert cache_files(tmp_path) == []
