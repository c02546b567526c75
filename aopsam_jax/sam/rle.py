"""COCO run-length encoding on the host (numpy), compatible with pycocotools.

COCO RLE flattens a mask in column-major (Fortran) order and stores run
lengths alternately for 0s and 1s, always starting with a run of zeros
(possibly of length 0).  The compressed form ("counts" as a string) is
pycocotools' `rleToString` encoding: each count (after the first two,
delta-coded against the count two places before) in 5-bit groups, with a
continuation bit, offset by ASCII 48.

No pycocotools needed; tests check byte-for-byte agreement with it.
"""

from __future__ import annotations

from typing import Dict, List, Sequence, Union

import numpy as np

Rle = Dict[str, object]


def encode_uncompressed(masks: np.ndarray) -> List[Rle]:
  """(N, H, W) or (H, W) bool masks -> list of {"size": [h, w], "counts": [int, ...]}.

  Vectorised over the batch: one diff and one nonzero for all masks.
  """
  masks = np.asarray(masks)
  single = masks.ndim == 2
  if single:
    masks = masks[None]
  n, h, w = masks.shape
  flat = masks.astype(bool).transpose(0, 2, 1).reshape(n, h * w)
  if h * w == 0:
    return [{"size": [h, w], "counts": [0]} for _ in range(n)]
  # Change points: position p where flat[p] != flat[p - 1]; a leading 1 is a
  # change from an implicit 0 at p = 0 (giving the zero-length first run).
  padded = np.zeros((n, h * w + 1), bool)
  padded[:, 1:] = flat
  change = padded[:, 1:] != padded[:, :-1]
  rows, pos = np.nonzero(change)
  splits = np.searchsorted(rows, np.arange(1, n))
  out = []
  for p in np.split(pos, splits):
    edges = np.concatenate([[0], p, [h * w]])
    out.append({"size": [h, w], "counts": np.diff(edges).astype(np.int64).tolist()})
  return out


def counts_to_string(counts: Sequence[int]) -> str:
  """pycocotools `rleToString`."""
  chars = []
  for i, x in enumerate(counts):
    x = int(x)
    if i > 2:
      x -= int(counts[i - 2])
    more = True
    while more:
      c = x & 0x1F
      x >>= 5
      more = (x != -1) if (c & 0x10) else (x != 0)
      if more:
        c |= 0x20
      chars.append(chr(c + 48))
  return "".join(chars)


def string_to_counts(s: Union[str, bytes]) -> List[int]:
  """pycocotools `rleFrString`."""
  if isinstance(s, bytes):
    s = s.decode("ascii")
  counts: List[int] = []
  p = 0
  while p < len(s):
    x = 0
    k = 0
    more = True
    while more:
      c = ord(s[p]) - 48
      x |= (c & 0x1F) << (5 * k)
      more = bool(c & 0x20)
      p += 1
      k += 1
      if not more and (c & 0x10):
        x |= -1 << (5 * k)
    if len(counts) > 2:
      x += counts[-2]
    counts.append(x)
  return counts


def compress(rle: Rle) -> Rle:
  """Uncompressed RLE -> COCO compressed RLE ({"size", "counts": str}); JSON-ready."""
  return {"size": list(rle["size"]), "counts": counts_to_string(rle["counts"])}


def encode(masks: np.ndarray) -> Union[Rle, List[Rle]]:
  """Bool masks -> COCO compressed RLE (as pycocotools `mask.encode`, but with
  str counts). (H, W) -> one dict, (N, H, W) -> a list."""
  masks = np.asarray(masks)
  rles = [compress(r) for r in encode_uncompressed(masks)]
  return rles[0] if masks.ndim == 2 else rles


def decode(rle: Rle) -> np.ndarray:
  """Compressed or uncompressed RLE -> (H, W) bool mask."""
  h, w = (int(v) for v in rle["size"])
  counts = rle["counts"]
  if isinstance(counts, (str, bytes)):
    counts = string_to_counts(counts)
  counts = np.asarray(counts, np.int64)
  if counts.sum() != h * w:
    raise ValueError(f"RLE counts sum to {counts.sum()}, expected {h * w}")
  values = (np.arange(len(counts)) % 2).astype(bool)
  flat = np.repeat(values, counts)
  return flat.reshape(w, h).T


def area(rle: Rle) -> int:
  counts = rle["counts"]
  if isinstance(counts, (str, bytes)):
    counts = string_to_counts(counts)
  return int(sum(counts[1::2]))
