"""Segment everything: parity with Meta's SamAutomaticMaskGenerator, its pieces, records, bad input."""

from __future__ import annotations

import math

import cv2
import numpy as np
import pytest
import torch

from conftest import SMALL_VIT, meta_twin, random_sam, smooth_weights, test_image
from segany.engine import everything_ops as ops
from segany.engine.everything import check_everything_options
from segany.engine.predictor import Predictor
from segany.errors import ConfigError

amg = pytest.importorskip("segment_anything.utils.amg")
mask_utils = pytest.importorskip("pycocotools.mask")


def smooth_sam(seed: int):
    """A random small SAM whose masks are smooth, local blobs (so NMS has real work)."""
    return smooth_weights(random_sam(SMALL_VIT, seed=seed))


@pytest.fixture(scope="module")
def models():
    """seed (or "raw": unsmoothed) -> (segany Predictor, Meta's model with the same weights)."""
    out = {}
    for seed in (2, 3, "raw"):
        ours = random_sam(SMALL_VIT, seed=0) if seed == "raw" else smooth_sam(seed)
        out[seed] = (Predictor(overrides=dict(device="cpu"), model=ours), meta_twin(ours, SMALL_VIT))
    return out


def _match(ours_masks: np.ndarray, ours_rec: list[dict], meta: list[dict]) -> tuple[list[int], np.ndarray]:
    """One-to-one assignment of Meta's masks to ours (Hungarian on 1 - mask IoU, with the
    prompt point and predicted IoU breaking ties between identical, e.g. empty, masks)."""
    from scipy.optimize import linear_sum_assignment

    a = ours_masks.reshape(len(ours_masks), -1).astype(np.float32)
    b = np.stack([amg.rle_to_mask(m["segmentation"]).reshape(-1) for m in meta]).astype(np.float32)
    inter = a @ b.T
    union = a.sum(1)[:, None] + b.sum(1)[None] - inter
    iou = np.where(union > 0, inter / np.maximum(union, 1), 1.0)
    same_pt = np.array([[np.allclose(r["point_coords"], m["point_coords"]) for m in meta] for r in ours_rec])
    d_score = np.abs(np.array([r["predicted_iou"] for r in ours_rec])[:, None]
                     - np.array([m["predicted_iou"] for m in meta])[None])
    rows, cols = linear_sum_assignment((1 - iou) + (~same_pt) + d_score)
    assert (rows == np.arange(len(rows))).all()
    return cols.tolist(), iou[rows, cols]


PARITY = {
    "filters off": (3, dict(points_per_side=8, pred_iou_thresh=0.0, stability_score_thresh=0.0)),
    "filters on": (2, dict(points_per_side=8, pred_iou_thresh=0.1, stability_score_thresh=0.3, box_nms_thresh=0.8)),
    "crop layer": (2, dict(points_per_side=4, crop_n_layers=1, pred_iou_thresh=0.0, stability_score_thresh=0.0)),
    # Plain random weights: salt-and-pepper masks, every pixel near the threshold somewhere.
    "noisy masks": ("raw", dict(points_per_side=6, pred_iou_thresh=0.0, stability_score_thresh=0.0,
                                box_nms_thresh=1.0)),
    "small regions": (3, dict(points_per_side=8, min_mask_region_area=100, pred_iou_thresh=0.0,
                              stability_score_thresh=0.0)),
    # Odd, non-square size; layers of 1, 4 and 16 crops with 8, 4 and 2 points a side; batches of 7.
    "crop layers 2, downscale 2": (2, dict(points_per_side=8, crop_n_layers=2, crop_n_points_downscale_factor=2,
                                           points_per_batch=7, pred_iou_thresh=0.0, stability_score_thresh=0.0),
                                   (187, 253)),
    "crops and small regions": (3, dict(points_per_side=6, crop_n_layers=1, min_mask_region_area=50,
                                        pred_iou_thresh=0.0, stability_score_thresh=0.0), (187, 253)),
    "user grids": (2, dict(point_grids=[np.random.default_rng(0).random((13, 2)),
                                        np.random.default_rng(1).random((7, 2))], crop_n_layers=1,
                           pred_iou_thresh=0.0, stability_score_thresh=0.0), (150, 199)),
    "tiny image": (3, dict(points_per_side=4, crop_n_layers=1, pred_iou_thresh=0.0, stability_score_thresh=0.0),
                   (20, 30)),
}


@pytest.mark.parametrize("case", list(PARITY))
def test_parity_with_meta(models, case, one_thread):
    from segment_anything import SamAutomaticMaskGenerator

    seed, kw, *shape = PARITY[case]
    pred, ref = models[seed]
    img = test_image(*(shape[0] if shape else (180, 240)))
    res = pred(source=img, **kw)[0]  # Meta's names are accepted as aliases
    meta_kw = dict(kw, points_per_side=None) if "point_grids" in kw else kw  # Meta: exactly one of them
    meta = SamAutomaticMaskGenerator(ref, output_mode="uncompressed_rle", **meta_kw).generate(img[..., ::-1].copy())
    assert len(res) == len(meta) > 0
    masks = res.masks.data.numpy()
    cols, ious = _match(masks, res.records, meta)
    assert ious.min() >= 0.99, f"{case}: a mask matches Meta's with IoU {ious.min():.4f}"
    for i, j in enumerate(cols):
        r, m = res.records[i], meta[j]
        assert abs(r["predicted_iou"] - m["predicted_iou"]) <= 1e-3
        s1, s2 = r["stability_score"], m["stability_score"]
        assert (math.isnan(s1) and math.isnan(s2)) or abs(s1 - s2) <= 1e-3
        np.testing.assert_allclose(r["point_coords"], m["point_coords"], rtol=0, atol=1e-9)
        assert r["crop_box"] == [int(v) for v in m["crop_box"]]
        # Documented fix: COCO width/height of an inclusive box (Meta's is one pixel short).
        if r["area"] > 0 and ious[i] == 1.0:
            assert r["area"] == m["area"]
            assert r["bbox"] == [m["bbox"][0], m["bbox"][1], m["bbox"][2] + 1, m["bbox"][3] + 1]
        elif r["area"] == 0:
            assert r["bbox"] == [0, 0, 0, 0] and m["area"] == 0
    if "crop" in case:
        assert len({tuple(r["crop_box"]) for r in res.records}) > 1, "no crop mask survived: weak test"


def test_records_results_and_coco(models):
    pred, _ = models[3]
    img = test_image(120, 160)
    res = pred(source=img, points_stride=6, conf_thres=0, stability_score_thresh=0)[0]
    n, (h, w) = len(res), img.shape[:2]
    assert n > 0 and res.masks.data.shape == (n, h, w) and res.masks.data.dtype == torch.bool
    assert res.boxes.cls.tolist() == list(range(n)) and res.low_res_logits is None
    for i, rec in enumerate(res.records):
        assert set(rec) == {"segmentation", "area", "bbox", "predicted_iou", "stability_score", "point_coords",
                            "crop_box"}
        seg = rec["segmentation"]
        assert seg["size"] == [h, w] and isinstance(seg["counts"], str)
        m = mask_utils.decode({"size": seg["size"], "counts": seg["counts"].encode()}).astype(bool)
        np.testing.assert_array_equal(m, res.masks.data[i].numpy())
        assert rec["area"] == int(m.sum()) and isinstance(rec["area"], int)
        if rec["area"]:
            ys, xs = np.nonzero(m)
            assert rec["bbox"] == [xs.min(), ys.min(), xs.max() - xs.min() + 1, ys.max() - ys.min() + 1]
            coco_box = mask_utils.toBbox(mask_utils.encode(np.asfortranarray(m.astype(np.uint8))))
            assert rec["bbox"] == [round(v) for v in coco_box]
        assert rec["predicted_iou"] == pytest.approx(float(res.boxes.conf[i]))
        assert len(rec["point_coords"]) == 1 and len(rec["point_coords"][0]) == 2
        assert rec["crop_box"] == [0, 0, w, h] and all(type(v) is int for v in rec["crop_box"])
    anns = res.to_coco(image_id=5)
    assert len(anns) == n
    for ann, rec in zip(anns, res.records):
        assert ann["image_id"] == 5 and ann["segmentation"] == rec["segmentation"]
        for key in ("predicted_iou", "stability_score", "point_coords", "crop_box"):
            assert key in ann
    assert len(res[1:3].records) == min(2, n - 1)


def test_conf_is_a_second_score_floor_off_by_default(models):
    pred, _ = models[3]
    img = test_image(120, 160)
    kw = dict(points_stride=4, conf_thres=0.0, stability_score_thresh=0)
    plain = pred(source=img, **kw)[0]
    scores = sorted(r["predicted_iou"] for r in plain.records)
    assert len(scores) >= 2 and scores[0] < scores[-1]
    floor = (scores[0] + scores[-1]) / 2
    # conf and conf_thres filter alike (at the same step), and the higher one decides
    by_conf = pred(source=img, conf=floor, **kw)[0]
    by_thres = pred(source=img, **{**kw, "conf_thres": floor})[0]
    both = pred(source=img, conf=0.01, **{**kw, "conf_thres": floor})[0]
    assert 0 < len(by_conf) < len(plain)
    assert all(r["predicted_iou"] > floor for r in by_conf.records)
    assert torch.equal(by_conf.masks.data, by_thres.masks.data) and torch.equal(by_conf.masks.data, both.masks.data)


@pytest.mark.parametrize("shape", [(1, 1), (5, 7), (3, 200)])
def test_tiny_images(models, shape):
    pred, _ = models[3]
    img = test_image(*shape)
    # More points a side than pixels; then crops (a 1-pixel side gives empty crops, skipped).
    for kw in (dict(points_stride=12, points_batch_size=144, conf_thres=0, stability_score_thresh=0),
               dict(points_stride=2, crop_n_layers=1, conf_thres=0, stability_score_thresh=0)):
        res = pred(source=img, **kw)[0]
        assert res.masks.data.shape[1:] == shape
        assert len(res.records) == len(res)
        for rec in res.records:
            x, y, bw, bh = rec["crop_box"]
            assert bw > 0 and bh > 0 and x + bw <= shape[1] and y + bh <= shape[0]


def test_large_image_small_model(models):
    pred, _ = models[3]
    h, w = 6000, 8000
    img = np.zeros((h, w, 3), np.uint8)
    img[h // 4 : h // 2, w // 4 : w // 2] = (30, 200, 240)
    res = pred(source=img, points_stride=2, conf_thres=0, stability_score_thresh=0)[0]
    assert len(res) > 0 and res.masks.data.shape == (len(res), h, w)
    assert [r["area"] for r in res.records] == res.masks.data.flatten(1).sum(1).tolist()


def test_sam_and_predictor_entry_points(tmp_path, small_ckpt):
    from segany import SAM

    path = tmp_path / "img.jpg"
    cv2.imwrite(str(path), test_image(96, 128))
    model = SAM(small_ckpt)
    res = model(str(path), points_stride=4, conf_thres=0, stability_score_thresh=0)
    assert len(res) == 1 and res[0].records is not None and len(res[0].records) == len(res[0])
    res = model.predictor(source=str(path), crop_n_layers=1, points_stride=2, conf_thres=0)
    assert res[0].masks.data.shape[1:] == (96, 128)


def test_sam2_family_runs_the_same_pipeline():
    from conftest import randomize
    from segany.checkpoints import config_with
    from segany.models import MODELS, build_model

    cfg = config_with(MODELS["sam2_t"], img_size=256, embed_dim=32, num_heads=2, stages=(1, 1, 2, 1),
                      global_att_blocks=(3,))
    pred = Predictor(overrides=dict(device="cpu"), model=randomize(build_model(cfg)))
    res = pred(source=test_image(60, 80), points_stride=2, conf_thres=0, stability_score_thresh=0, iou=1.0)[0]
    assert len(res) == 12 and res.masks.data.shape == (12, 60, 80)  # 4 points x 3 masks, nothing suppressed


@pytest.mark.parametrize("version,use_m2m", [("2", False), ("2.1", False), ("2.1", True)])
def test_sam2_parity_with_sam2_generator(version, use_m2m, one_thread):
    """SAM 2 against sam2's SAM2AutomaticMaskGenerator at its multimask_output=True and
    min_mask_region_area=0, with and without its mask-to-mask refinement: direct low-res → image
    upsampling, batches of 5."""
    pytest.importorskip("sam2", reason="Meta's sam2 package is a test-only reference")
    from sam2.automatic_mask_generator import SAM2AutomaticMaskGenerator
    from test_sam2 import Pair

    pair = Pair(version, small=True, seed=3)
    img = test_image(123, 161)
    kw = dict(points_per_side=4, points_per_batch=5, pred_iou_thresh=0.0, stability_score_thresh=0.0,
              box_nms_thresh=1.0, use_m2m=use_m2m)  # random SAM 2 weights give image-wide masks: keep them all
    res = Predictor(overrides=dict(device="cpu"), model=pair.ours, config=pair.config)(source=img, **kw)[0]
    gen = SAM2AutomaticMaskGenerator(pair.ref, output_mode="uncompressed_rle", **kw)
    s = pair.size
    gen.predictor._bb_feat_sizes = [(s // 4, s // 4), (s // 8, s // 8), (s // 16, s // 16)]  # set for 1024
    meta = gen.generate(np.ascontiguousarray(img[..., ::-1]))
    assert len(res) == len(meta) == 48
    cols, ious = _match(res.masks.data.numpy(), res.records, meta)
    assert ious.min() >= 0.99
    for i, j in enumerate(cols):
        r, m = res.records[i], meta[j]
        assert abs(r["predicted_iou"] - m["predicted_iou"]) <= 1e-3
        np.testing.assert_allclose(r["stability_score"], m["stability_score"], rtol=0, atol=1e-3, equal_nan=True)
        np.testing.assert_allclose(r["point_coords"], m["point_coords"], rtol=0, atol=1e-4)  # sam2: float32
        assert r["crop_box"] == m["crop_box"]


# ----------------------------------------------------------------------------- bad input
@pytest.mark.parametrize("kw,name", [
    (dict(points_stride=-1), "points_stride"),
    (dict(points_per_side=0), "points_per_side"),
    (dict(points_stride=2.5), "points_stride"),
    (dict(points_stride=True), "points_stride"),
    (dict(points_stride=None), "points_stride"),
    (dict(points_batch_size=0), "points_batch_size"),
    (dict(crop_n_layers=-1), "crop_n_layers"),
    (dict(crop_n_layers=1.5), "crop_n_layers"),
    (dict(crop_overlap_ratio=1.0), "crop_overlap_ratio"),
    (dict(crop_overlap_ratio=-0.1), "crop_overlap_ratio"),
    (dict(crop_downscale_factor=0), "crop_downscale_factor"),
    (dict(crop_n_layers=3, points_stride=4, crop_downscale_factor=2), "crop_downscale_factor"),
    (dict(conf_thres=1.5), "conf_thres"),
    (dict(pred_iou_thresh=float("nan")), "pred_iou_thresh"),
    (dict(stability_score_thresh="high"), "stability_score_thresh"),
    (dict(stability_score_offset=-1), "stability_score_offset"),
    (dict(iou=1.2), "iou"),
    (dict(crop_nms_thresh=-0.5), "crop_nms_thresh"),
    (dict(min_mask_region_area=-5), "min_mask_region_area"),
    (dict(use_m2m="yes"), "use_m2m"),
    (dict(use_m2m=1), "use_m2m"),
    (dict(point_grids=[np.zeros((4, 3))]), "point_grids"),
    (dict(point_grids=[np.full((4, 2), 2.0)]), r"point_grids\[0\] holds the point \[2.0, 2.0\]"),
    (dict(point_grids=[np.zeros((4, 2))], crop_n_layers=1), "point_grids"),
    (dict(points_per_sid=8), "points_per_sid"),
])
def test_bad_parameters_name_the_parameter(models, kw, name):
    pred, _ = models[3]
    calls = []
    pred.encode = lambda *a, **k: calls.append(1)  # must fail before encoding
    try:
        with pytest.raises(ConfigError, match=name):
            pred(source=test_image(32, 32), **kw)
    finally:
        del pred.encode
    assert not calls


def test_point_grids_replace_the_stride(models):
    pred, _ = models[3]
    grid = np.array([[0.25, 0.25], [0.75, 0.5]])
    res = pred(source=test_image(60, 80), point_grids=grid, conf_thres=0, stability_score_thresh=0, iou=1.0)[0]
    assert sorted({tuple(r["point_coords"][0]) for r in res.records}) == [(20.0, 15.0), (60.0, 30.0)]
    assert check_everything_options({**_defaults(), "point_grids": [grid, grid]}).point_grids[1].shape == (2, 2)


def _defaults():
    from segany.config import EVERYTHING_DEFAULTS

    return dict(EVERYTHING_DEFAULTS)


# ----------------------------------------------------------------------------- pieces
def _random_masks(n: int, h: int, w: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    low = torch.rand(n, 1, max(h // 5, 1), max(w // 5, 1), generator=g)
    m = torch.nn.functional.interpolate(low, size=(h, w), mode="bilinear")[:, 0] > 0.6
    m[0] = False
    m[1] = True
    m[2] = False
    m[2, -1, -1] = True  # last pixel only
    m[3] = False
    m[3, 0, :] = True  # top row
    m[4] = False
    m[4, :, -1] = True  # right column
    m[5] = torch.rand(h, w, generator=g) > 0.5
    return m


@pytest.mark.parametrize("crop_box", [[0, 0, 40, 30], [10, 0, 30, 30], [0, 5, 40, 20], [7, 3, 19, 30],
                                      [39, 29, 40, 30]])
def test_run_length_codes_and_boxes_match_meta(crop_box):
    big_h, big_w = 30, 40
    x0, y0, x1, y1 = crop_box
    masks = _random_masks(8, y1 - y0, x1 - x0, seed=x0 + y0)
    trans = ops.column_transitions(masks.transpose(1, 2).float() * 2 - 1, 0.0)
    torch_path = ops.column_transitions(masks.transpose(1, 2), 0.0, use_numpy=False)  # the GPU code path
    assert np.array_equal(trans.mask, torch_path.mask) and np.array_equal(trans.pos, torch_path.pos)
    meta_rles = amg.mask_to_rle_pytorch(amg.uncrop_masks(masks, crop_box, big_h, big_w))
    assert ops.transition_boxes(trans).tolist() == amg.batched_mask_to_box(masks).tolist()
    counts = ops.transition_counts(trans, np.arange(len(masks)), crop_box, (big_h, big_w))
    for i in range(len(masks)):
        assert counts[i].tolist() == meta_rles[i]["counts"]
        rle = ops.encode_counts(counts[i], (big_h, big_w))
        np.testing.assert_array_equal(mask_utils.decode(rle).view(bool), amg.rle_to_mask(meta_rles[i]))
        assert rle["counts"].decode() == amg.coco_encode_rle(meta_rles[i])["counts"]
    some = ops.transition_counts(trans, np.array([0, 3, 4, 6]), crop_box, (big_h, big_w))
    assert [c.tolist() for c in some] == [meta_rles[i]["counts"] for i in (0, 3, 4, 6)]
    full = amg.uncrop_masks(masks, crop_box, big_h, big_w)
    assert ops.mask_to_counts(full[5].numpy()).tolist() == meta_rles[5]["counts"]
    # Masks rebuilt from the counts, by the CPU's fill and the GPU's boundary sum (run here on the CPU).
    assert torch.equal(ops.counts_to_masks(counts, (big_h, big_w)), full)
    assert torch.equal(ops._sum_boundaries(counts, (big_h, big_w), torch.device("cpu")), full)


@pytest.mark.parametrize("orig", [(180, 240), (1000, 700), (7, 3), (256, 256)])
def test_upsampler_equals_postprocess_masks(orig):
    model = random_sam(SMALL_VIT)
    inp = model.input_size(*orig)
    low = torch.randn(3, 64, 64) * 4
    up = ops.Upsampler(model, inp, orig)
    ref = model.postprocess_masks(low[:, None], inp, orig)[:, 0]
    assert up.rows is None and (up(low).transpose(1, 2) - ref).abs().max() <= 1e-4
    assert up.rows is not None  # the matrix form was recognised

    class Stretch(torch.nn.Module):  # SAM 2 style: one resize, no padding
        img_size = 256

        def postprocess_masks(self, m, input_size, original_size):
            return torch.nn.functional.interpolate(m, original_size, mode="bilinear", align_corners=False)

    class Odd(Stretch):  # unknown upsampling: the model's own function is used
        def postprocess_masks(self, m, input_size, original_size):
            return torch.nn.functional.interpolate(m, original_size, mode="nearest")

    for cls, matrix in ((Stretch, True), (Odd, False)):
        m = cls()
        up = ops.Upsampler(m, inp, orig)
        ref = m.postprocess_masks(low[:, None], inp, orig)[:, 0]
        assert (up(low).transpose(1, 2) - ref).abs().max() <= 1e-4 and (up.rows is not None) == matrix


def test_upsampler_stays_fp32_under_autocast():
    """half=True decodes under bf16 autocast: the upsampling keeps its fp32 matrix form (it fell
    back to the slow postprocess_masks, and a built one gave bf16 logits ~0.16 off)."""
    model = random_sam(SMALL_VIT)
    orig = (187, 253)
    inp = model.input_size(*orig)
    low = torch.randn(3, 64, 64) * 8
    ref = model.postprocess_masks(low[:, None], inp, orig)[:, 0]
    built = ops.Upsampler(model, inp, orig)
    built(low)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        up = ops.Upsampler(model, inp, orig)
        outs = [up(low), built(low)]
    assert up.rows is not None
    for got in outs:
        assert got.dtype == torch.float32 and (got.transpose(1, 2) - ref).abs().max() <= 1e-4


def test_stability_score_matches_meta():
    logits = torch.randn(5, 40, 30) * 3
    logits[0] = -5  # empty: NaN as Meta
    ours = ops.stability_score(logits, 0.0, 1.0)
    ref = amg.calculate_stability_score(logits, 0.0, 1.0)
    torch.testing.assert_close(ours, ref, equal_nan=True)
    m = logits > 0
    np.testing.assert_array_equal(ops._count(m, use_numpy=False), ops._count(m, use_numpy=True))
