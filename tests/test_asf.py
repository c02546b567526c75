"""ASF on constructed heatmaps with a fake decoder whose masks are known."""


import jax
import jax.numpy as jnp
import numpy as np
import pytest

from aopsam_jax.aop import asf

L = 256  # heatmap / low-res size
FULL = np.array([1024, 1024], np.int32)


def label_map(rects):
  """rects: list of (label, r0, r1, c0, c1) on the L x L grid (later ones on top)."""
  lab = np.zeros((L, L), np.int32)
  for v, r0, r1, c0, c1 in rects:
    lab[r0:r1, c0:c1] = v
  return lab


def fake_decoder(lab, extra=None):
  """Decoder returning the instance under the point: candidate 0 = the instance
  (logits +-10, predicted IoU 0.95), candidates 1, 2 = the full image and a
  single pixel with low predicted IoU (filtered).  Background: IoU 0.1.
  `extra` maps a label to a different mask to return for it."""
  lab_j = jnp.asarray(lab)
  n_lab = int(lab.max()) + 1
  masks = np.stack([lab == v for v in range(n_lab)]).astype(np.float32)
  for v, mk in (extra or {}).items():
    masks[v] = mk
  masks_j = jnp.asarray(masks)
  full = jnp.ones((L, L), jnp.float32)
  dot = jnp.zeros((L, L), jnp.float32).at[0, 0].set(1.0)

  def decode(points_in, valid):
    pix = jnp.clip(jnp.floor(points_in / 4.0).astype(jnp.int32), 0, L - 1)
    v = lab_j[pix[:, 1], pix[:, 0]]
    m0 = masks_j[v]
    logits = jnp.stack([m0, jnp.broadcast_to(full, m0.shape), jnp.broadcast_to(dot, m0.shape)],
                       1) * 20.0 - 10.0
    iou0 = jnp.where(v > 0, 0.95, 0.1)
    iou = jnp.stack([iou0, jnp.full_like(iou0, 0.3), jnp.full_like(iou0, 0.2)], 1)
    return logits, iou
  return decode


def heatmap(peaks_rc_p, sigma=2.0):
  """Sum of Gaussian bumps (row, col, peak probability) -> logits."""
  yy, xx = np.mgrid[:L, :L]
  prob = np.full((L, L), 1e-4)
  for r, c, p in peaks_rc_p:
    prob = np.maximum(prob, p * np.exp(-((yy - r) ** 2 + (xx - c) ** 2) / (2 * sigma ** 2)))
  prob = np.clip(prob, 1e-6, 1 - 1e-6)
  return jnp.asarray(np.log(prob / (1 - prob)), jnp.float32)


def run(hm, dec, input_hw=FULL, stage_loop=False, **kw):
  cfg = asf.AsfConfig(**kw)
  fn = jax.jit(lambda h, ihw: asf.run(h, ihw, dec, cfg, stage_loop=stage_loop))
  return jax.device_get(fn(hm, jnp.asarray(input_hw)))


def out_masks(out):
  return np.asarray(out["low_res_logits"])[np.asarray(out["valid"])] > 0


A = (1, 40, 100, 40, 120)     # rows 40..99, cols 40..119
B = (2, 150, 200, 160, 220)


def test_two_peaks_in_one_instance_one_prompt_survives():
  lab = label_map([A])
  hm = heatmap([(60, 60, 0.9), (80, 100, 0.7)])
  out = run(hm, fake_decoder(lab), k_coarse=4, k_fine=2)
  assert int(out["num_prompts"]) == 2  # both peaks decoded (one batch)
  acc = np.asarray(out["prompt_accepted"])
  pv = np.asarray(out["prompt_valid"])
  assert pv[:2].all() and acc.sum() == 1
  # the surviving prompt is the higher peak, at its pixel centre (x = col + .5) * 4
  i = int(np.nonzero(acc)[0][0])
  np.testing.assert_allclose(out["prompts_in"][i], [(60 + 0.5) * 4, (60 + 0.5) * 4])
  masks = out_masks(out)
  assert masks.shape[0] == 1
  np.testing.assert_array_equal(masks[0], lab == 1)
  assert int(out["mask_index"][0]) == 0 and abs(float(out["iou"][0]) - 0.95) < 1e-6


def test_peak_in_uncovered_instance_found_in_fine_stage():
  lab = label_map([A, B])
  # A has two peaks, B one that is lower than A's best; only one coarse slot.
  hm = heatmap([(60, 60, 0.9), (80, 100, 0.5), (175, 190, 0.6)])
  out = run(hm, fake_decoder(lab), k_coarse=1, k_fine=3)
  pv = np.asarray(out["prompt_valid"])
  assert pv[0] and pv[1:].sum() == 1  # fine stage: only B's peak (A's second is covered)
  j = 1 + int(np.nonzero(pv[1:])[0][0])
  np.testing.assert_allclose(out["prompts_in"][j], [190.5 * 4, 175.5 * 4])
  masks = out_masks(out)
  assert masks.shape[0] == 2
  got = sorted(int(lab[m].max()) for m in masks)
  assert got == [1, 2]
  for m in masks:
    np.testing.assert_array_equal(m, lab == lab[m].max())
  st = np.asarray(out["stage"])[np.asarray(out["valid"])]
  assert sorted(st.tolist()) == [0, 1]


def test_decoder_may_skip_slots_past_the_valid_ones():
  """Valid slots come first, and ASF ignores the rest: a decoder that returns
  a confident full-image mask (which would pass every filter) for every slot
  from sum(valid) on changes nothing (what `pipeline` relies on to skip them)."""
  lab = label_map([A, B])
  hm = heatmap([(60, 60, 0.9), (175, 190, 0.6), (80, 100, 0.5)])
  honest = fake_decoder(lab)

  def skipping(points_in, valid):
    logits, iou = honest(points_in, valid)
    past = jnp.arange(valid.shape[0]) >= jnp.sum(valid.astype(jnp.int32))
    return (jnp.where(past[:, None, None, None], 10.0, logits),
            jnp.where(past[:, None], 0.99, iou))

  a = run(hm, honest, k_coarse=6, k_fine=4)
  b = run(hm, skipping, k_coarse=6, k_fine=4)
  assert 0 < int(a["num_prompts"]) < 10 and int(a["valid"].sum()) == 2
  for key in ("valid", "prompt_valid", "prompt_accepted", "num_kept", "num_filtered"):
    np.testing.assert_array_equal(a[key], b[key], err_msg=key)
  ok = np.asarray(a["valid"])
  np.testing.assert_array_equal(a["iou"][ok], b["iou"][ok])
  np.testing.assert_array_equal(out_masks(a), out_masks(b))


@pytest.mark.parametrize("k_coarse, k_fine", [(1, 3), (2, 1), (6, 4), (3, 3)])
def test_stages_in_one_loop_give_the_same_outputs(k_coarse, k_fine):
  """`stage_loop` (both stages as one scan over max(k_coarse, k_fine) slots)
  against the two separate stages: every output equal, with fine-stage
  prompts found (uncovered instance, peaks used and covered by the coarse
  stage excluded) and slots left empty."""
  lab = label_map([A, B, (3, 210, 240, 20, 60)])
  by_score = [(60, 60, 0.9), (175, 190, 0.6), (80, 100, 0.5), (225, 40, 0.3), (120, 230, 0.2)]
  hm = heatmap(by_score)
  a = run(hm, fake_decoder(lab), k_coarse=k_coarse, k_fine=k_fine)
  b = run(hm, fake_decoder(lab), k_coarse=k_coarse, k_fine=k_fine, stage_loop=True)
  assert set(a) == set(b)
  for key in a:
    np.testing.assert_array_equal(a[key], b[key], err_msg=key)
  # Independent of both forms: the coarse stage decodes the best k_coarse peaks; the
  # instances they hit are accepted (the background's IoU 0.1 is filtered), and the fine
  # stage decodes the best k_fine of the remaining peaks outside those instances.
  coarse = [(r, c) for r, c, _ in by_score[:k_coarse]]
  hit = {lab[r, c] for r, c in coarse} - {0}
  fine = [(r, c) for r, c, _ in by_score[k_coarse:] if lab[r, c] not in hit][:k_fine]
  valid = np.asarray(a["prompt_valid"])
  rc = lambda i: tuple(int(v) for v in np.asarray(a["prompts_in"])[i][::-1] / 4.0 - 0.5)
  assert [rc(i) for i in np.flatnonzero(valid[:k_coarse])] == coarse
  assert [rc(k_coarse + i) for i in np.flatnonzero(valid[k_coarse:])] == fine
  assert int(a["valid"].sum()) >= 2


def test_fine_threshold_lower_than_coarse():
  lab = label_map([A, B])
  # B's peak (0.04) is below the coarse threshold (max(0.05, 0.1*0.9)) but
  # above the fine one (max(0.02, 0.05*0.9)).
  hm = heatmap([(60, 60, 0.9), (175, 190, 0.06)])
  out = run(hm, fake_decoder(lab), k_coarse=4, k_fine=2)
  pv = np.asarray(out["prompt_valid"])
  assert pv[:4].sum() == 1 and pv[4:].sum() == 1
  assert sorted(int(lab[m].max()) for m in out_masks(out)) == [1, 2]
  hm_low = heatmap([(60, 60, 0.9), (175, 190, 0.03)])  # below both
  out = run(hm_low, fake_decoder(lab), k_coarse=4, k_fine=2)
  assert int(out["num_prompts"]) == 1


def test_empty_heatmap_no_prompts_valid_empty_output():
  lab = label_map([A])
  hm = jnp.full((L, L), -12.0, jnp.float32)
  out = run(hm, fake_decoder(lab), k_coarse=4, k_fine=2, max_masks=5)
  assert int(out["num_prompts"]) == 0
  assert not np.asarray(out["prompt_valid"]).any()
  assert not np.asarray(out["valid"]).any()
  assert out["low_res_logits"].shape == (5, L, L)
  assert int(out["num_kept"]) == 0 and int(out["num_filtered"]) == 0


def test_padding_region_is_ignored():
  lab = label_map([A, B])
  hm = heatmap([(60, 60, 0.9), (175, 190, 0.9)])
  # input 512 x 1024: heatmap rows >= 128 are padding; B's peak lies there.
  out = run(hm, fake_decoder(lab), input_hw=np.array([512, 1024], np.int32), k_coarse=4)
  assert int(out["num_prompts"]) == 1
  assert [int(lab[m].max()) for m in out_masks(out)] == [1]


def test_background_and_low_iou_candidates_filtered():
  lab = label_map([A])
  hm = heatmap([(60, 60, 0.9), (200, 200, 0.8)])  # second peak on background
  out = run(hm, fake_decoder(lab), k_coarse=4, k_fine=0)
  assert int(out["num_prompts"]) == 2
  assert int(out["num_filtered"]) == 1  # only A's instance candidate passes
  assert np.asarray(out["prompt_accepted"]).sum() == 1
  # with the IoU filter off, every candidate of both prompts passes
  # (stability of the +-10 masks is 1; the full-image / dot ones too)
  # what each filter removed, in order: 2 prompts x 3 candidates decoded
  counts = {k: int(out[k]) for k in ("num_candidates", "removed_iou", "removed_stability",
                                     "removed_redundant", "removed_nms")}
  assert counts == {"num_candidates": 6, "removed_iou": 5, "removed_stability": 0,
                    "removed_redundant": 0, "removed_nms": 0}
  out = run(hm, fake_decoder(lab), k_coarse=4, k_fine=0, pred_iou_thresh=0.0)
  assert int(out["num_filtered"]) == 6
  assert int(out["removed_iou"]) == 0 and int(out["removed_redundant"]) == 4


def test_mask_nms_removes_overlapping_masks():
  # instance C's point lies outside A, but the decoder returns a mask
  # nearly equal to A for it -> not redundant as a prompt, removed by NMS.
  lab = label_map([A, (3, 100, 104, 40, 120)])
  near_a = ((lab == 1) | (lab == 3)).astype(np.float32)
  hm = heatmap([(60, 60, 0.9), (102, 80, 0.8)])
  out = run(hm, fake_decoder(lab, extra={3: near_a}), k_coarse=4, k_fine=0)
  acc = np.asarray(out["prompt_accepted"])
  assert acc.sum() == 2  # both prompts accepted ...
  assert int(out["num_kept"]) == 1  # ... but one mask survives NMS
  assert int(out["removed_nms"]) == 1
  out = run(hm, fake_decoder(lab, extra={3: near_a}), k_coarse=4, k_fine=0, nms_thresh=0.99)
  assert int(out["num_kept"]) == 2


def test_masks_per_prompt_keeps_more_candidates():
  lab = label_map([A])
  hm = heatmap([(60, 60, 0.9)])
  out = run(hm, fake_decoder(lab), k_coarse=2, k_fine=0, pred_iou_thresh=0.25,
            masks_per_prompt=3, max_masks=6)
  # candidates with IoU 0.95 and 0.3 pass; the 0.2 one does not
  assert int(out["num_kept"]) == 2
  np.testing.assert_allclose(np.sort(out["iou"][out["valid"]]), [0.3, 0.95], atol=1e-6)
  assert sorted(out["mask_index"][out["valid"]].tolist()) == [0, 1]


def _greedy_np(scores, valid, sup):
  order = sorted([i for i in range(len(scores)) if valid[i]], key=lambda i: (-scores[i], i))
  keep = np.zeros(len(scores), bool)
  dead = set()
  for i in order:
    if i in dead:
      continue
    keep[i] = True
    for j in order[order.index(i) + 1:]:
      if sup[i, j]:
        dead.add(j)
  return keep


def test_greedy_suppress_matches_reference():
  rng = np.random.default_rng(0)
  for _ in range(5):
    n = 12
    scores = rng.integers(0, 5, n).astype(np.float32)  # ties on purpose
    valid = rng.random(n) < 0.8
    sup = rng.random((n, n)) < 0.3
    got = np.asarray(asf.greedy_suppress(jnp.asarray(scores), jnp.asarray(valid),
                                         jnp.asarray(sup)))
    np.testing.assert_array_equal(got, _greedy_np(scores, valid, sup))


def test_config_validation():
  with pytest.raises(ValueError):
    asf.AsfConfig(k_coarse=0)
  assert asf.AsfConfig().max_prompts == asf.AsfConfig().k_coarse + asf.AsfConfig().k_fine
