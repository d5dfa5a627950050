"""Parity of segany.engine.amg_utils with Meta's segment_anything.utils.amg and torchvision NMS."""

from __future__ import annotations

import ast
import pathlib
import time

import numpy as np
import pytest
import torch

from segany.engine import amg_utils as ours

meta = pytest.importorskip("segment_anything.utils.amg")
tv_ops = pytest.importorskip("torchvision.ops")
mask_utils = pytest.importorskip("pycocotools.mask")


def _random_masks(n: int, h: int, w: int, seed: int) -> torch.Tensor:
    """Blobby random masks plus edge cases: empty, full, border-touching, single pixels."""
    g = torch.Generator().manual_seed(seed)
    low = torch.rand(n, 1, max(h // 4, 1), max(w // 4, 1), generator=g)
    masks = torch.nn.functional.interpolate(low, size=(h, w), mode="bilinear")[:, 0] > 0.6
    masks[0] = False  # empty
    masks[1] = True  # full
    masks[2] = False
    masks[2, 0, 0] = True  # top-left pixel only
    masks[3] = False
    masks[3, h - 1, w - 1] = True  # bottom-right pixel only
    masks[4] = False
    masks[4, :, w - 1] = True  # right column
    masks[5] = torch.rand(h, w, generator=g) > 0.5  # salt and pepper: many runs
    return masks


# ----------------------------------------------------------------------------- grids and crops
@pytest.mark.parametrize("n", [1, 2, 7, 32, 64])
def test_build_point_grid(n: int) -> None:
    got = ours.build_point_grid(n)
    np.testing.assert_array_equal(got, meta.build_point_grid(n))
    assert got.shape == (n * n, 2) and got.dtype == np.float64


@pytest.mark.parametrize("n,layers,scale", [(32, 0, 1), (32, 2, 2), (16, 1, 1), (33, 3, 2)])
def test_build_all_layer_point_grids(n: int, layers: int, scale: int) -> None:
    got = ours.build_all_layer_point_grids(n, layers, scale)
    ref = meta.build_all_layer_point_grids(n, layers, scale)
    assert len(got) == len(ref) == layers + 1
    for a, b in zip(got, ref):
        np.testing.assert_array_equal(a, b)


def test_point_grid_rejects_zero() -> None:
    with pytest.raises(ValueError):
        ours.build_point_grid(0)
    with pytest.raises(ValueError):
        ours.build_all_layer_point_grids(4, 3, 2)  # 4 / 2**3 < 1


@pytest.mark.parametrize("im_size", [(1500, 1000), (1000, 1500), (7, 5), (5, 7), (1024, 1024), (480, 640), (1, 1)])
@pytest.mark.parametrize("n_layers", [0, 1, 2, 3])
@pytest.mark.parametrize("ratio", [512 / 1500, 0.0, 0.25])
def test_generate_crop_boxes(im_size: tuple[int, int], n_layers: int, ratio: float) -> None:
    boxes, layers = ours.generate_crop_boxes(im_size, n_layers, ratio)
    ref_boxes, ref_layers = meta.generate_crop_boxes(im_size, n_layers, ratio)
    assert boxes == ref_boxes and layers == ref_layers
    assert all(type(v) is int for box in boxes for v in box)
    assert all(type(v) is int for v in layers)
    assert len(boxes) == sum(4**i for i in range(n_layers + 1))


def test_generate_crop_boxes_numpy_sizes_give_python_ints() -> None:
    h, w = np.zeros((1500, 1000, 3)).shape[:2]
    boxes, _ = ours.generate_crop_boxes((np.int64(h), np.int64(w)), 2, 512 / 1500)
    assert boxes == meta.generate_crop_boxes((1500, 1000), 2, 512 / 1500)[0]
    assert all(type(v) is int for box in boxes for v in box)


# ----------------------------------------------------------------------------- stability score
@pytest.mark.parametrize("shape", [(40, 64, 80), (3, 1, 7), (0, 16, 16), (2, 3, 32, 48)])
@pytest.mark.parametrize("offset", [1.0, 0.5])
def test_calculate_stability_score(shape: tuple[int, ...], offset: float) -> None:
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(*shape, generator=g) * 4
    if logits.numel():
        logits.view(-1, *shape[-2:])[0] = -10.0  # all background -> NaN, as Meta
    got = ours.calculate_stability_score(logits, 0.0, offset, chunk_size=7)
    ref = meta.calculate_stability_score(logits, 0.0, offset)
    assert got.shape == ref.shape and got.dtype == ref.dtype
    torch.testing.assert_close(got, ref, equal_nan=True, rtol=0, atol=0)


# ----------------------------------------------------------------------------- boxes
@pytest.mark.parametrize("hw", [(37, 53), (7, 5), (1, 1), (64, 64)])
def test_batched_mask_to_box(hw: tuple[int, int]) -> None:
    h, w = hw
    masks = _random_masks(12, h, w, seed=2)
    got = ours.batched_mask_to_box(masks)
    ref = meta.batched_mask_to_box(masks)
    assert got.dtype == torch.int64
    torch.testing.assert_close(got, ref, rtol=0, atol=0)
    # leading dims and no-element inputs
    torch.testing.assert_close(ours.batched_mask_to_box(masks.view(3, 4, h, w)), ref.view(3, 4, 4))
    assert ours.batched_mask_to_box(masks[:0]).shape == (0, 4)
    assert ours.batched_mask_to_box(torch.zeros(2, 3, 0, 5, dtype=torch.bool)).shape == (2, 3, 4)


def test_box_xyxy_to_xywh_matches_pycocotools() -> None:
    masks = _random_masks(10, 31, 45, seed=3)
    boxes = ours.batched_mask_to_box(masks)
    areas = masks.flatten(1).sum(1)
    xywh = ours.box_xyxy_to_xywh(boxes, empty=areas == 0)
    rles = mask_utils.encode(np.asfortranarray(masks.permute(1, 2, 0).numpy().astype(np.uint8)))
    np.testing.assert_array_equal(xywh.numpy(), mask_utils.toBbox(rles))
    # Meta's AMG bbox is one pixel short; crop boxes are exclusive and keep Meta's formula.
    meta_xywh = torch.stack([meta.box_xyxy_to_xywh(b) for b in boxes])
    nonempty = areas > 0
    torch.testing.assert_close(xywh[nonempty, 2:], meta_xywh[nonempty, 2:] + 1)
    crop = torch.tensor([100, 50, 612, 562])
    torch.testing.assert_close(ours.box_xyxy_to_xywh(crop, inclusive=False), meta.box_xyxy_to_xywh(crop))


# ----------------------------------------------------------------------------- uncrop
def test_uncrop_and_edge() -> None:
    g = torch.Generator().manual_seed(4)
    orig_h, orig_w = 1500, 1000
    crops, _ = ours.generate_crop_boxes((orig_h, orig_w), 2, 512 / 1500)
    for crop in crops:
        cw, ch = crop[2] - crop[0], crop[3] - crop[1]
        xy = torch.randint(0, min(cw, ch), (50, 2), generator=g)
        boxes = torch.cat([xy, xy + torch.randint(0, min(cw, ch) // 2 + 1, (50, 2), generator=g)], 1)
        boxes = boxes.clamp(max=min(cw, ch) - 1)
        boxes[0] = torch.tensor([0, 0, cw - 1, ch - 1])  # touches every crop edge
        boxes[1] = torch.tensor([25, 25, 30, 30])
        for b in (boxes, boxes.float()):
            torch.testing.assert_close(ours.uncrop_boxes_xyxy(b, crop), meta.uncrop_boxes_xyxy(b, crop))
            torch.testing.assert_close(
                ours.uncrop_boxes_xyxy(b[None], crop), meta.uncrop_boxes_xyxy(b[None], crop)
            )
            got = ours.is_box_near_crop_edge(b, crop, [0, 0, orig_w, orig_h])
            ref = meta.is_box_near_crop_edge(b, crop, [0, 0, orig_w, orig_h])
            assert torch.equal(got, ref)
        pts = torch.rand(20, 2, generator=g, dtype=torch.float64) * 100
        torch.testing.assert_close(ours.uncrop_points(pts, crop), meta.uncrop_points(pts, crop))
        torch.testing.assert_close(ours.uncrop_points(pts[None], crop), meta.uncrop_points(pts[None], crop))
    masks = _random_masks(6, 30, 20, seed=5)
    for crop in ([0, 0, 20, 30], [10, 5, 30, 35], [0, 20, 20, 50], [5, 0, 25, 30]):
        got = ours.uncrop_masks(masks, crop, 50, 40)
        assert torch.equal(got, meta.uncrop_masks(masks, crop, 50, 40))
        assert got.dtype == torch.bool
    assert ours.uncrop_masks(masks, [0, 0, 20, 30], 30, 20) is masks


# ----------------------------------------------------------------------------- RLE
@pytest.mark.filterwarnings("ignore::DeprecationWarning:pycocotools")
@pytest.mark.parametrize("hw", [(37, 53), (7, 5), (1, 1), (1, 9), (64, 48)])
def test_rle_roundtrip_and_parity(hw: tuple[int, int]) -> None:
    h, w = hw
    masks = _random_masks(16, h, w, seed=6)
    rles = ours.mask_to_rle_torch(masks)
    assert rles == meta.mask_to_rle_pytorch(masks)
    for m, rle in zip(masks.numpy(), rles):
        assert all(type(c) is int for c in rle["counts"])
        back = ours.rle_to_mask(rle)
        np.testing.assert_array_equal(back, m)
        np.testing.assert_array_equal(back, meta.rle_to_mask(rle))
        assert back.flags["C_CONTIGUOUS"] and back.dtype == bool
        assert ours.area_from_rle(rle) == meta.area_from_rle(rle) == int(m.sum())
        coco = ours.coco_encode_rle(rle)
        assert coco == meta.coco_encode_rle(rle)
        assert isinstance(coco["counts"], str)
        np.testing.assert_array_equal(mask_utils.decode(mask_utils.frPyObjects(rle, h, w)), m)
        assert mask_utils.area(coco) == m.sum()
    assert ours.mask_to_rle_torch(masks[:0]) == []


def test_rle_to_mask_rejects_bad_counts() -> None:
    with pytest.raises(ValueError):
        ours.rle_to_mask({"size": [3, 3], "counts": [2, 3]})


# ----------------------------------------------------------------------------- small regions
@pytest.mark.parametrize("mode", ["holes", "islands"])
@pytest.mark.parametrize("thresh", [0, 5, 40, 400, 10_000])
def test_remove_small_regions(mode: str, thresh: int) -> None:
    masks = _random_masks(12, 41, 57, seed=7).numpy()
    masks[6] = False
    masks[6, 3:5, 3:5] = True  # one tiny island: islands mode keeps it (largest)
    masks[7] = np.asfortranarray(masks[7])  # as Meta's rle_to_mask hands it over
    for m in masks:
        got, changed = ours.remove_small_regions(m, thresh, mode)
        ref, ref_changed = meta.remove_small_regions(m, thresh, mode)
        assert changed == ref_changed
        np.testing.assert_array_equal(got, ref)
    with pytest.raises(ValueError):
        ours.remove_small_regions(masks[0], 10, "blobs")


# ----------------------------------------------------------------------------- NMS
def _random_boxes(n: int, seed: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    xy = torch.rand(n, 2, generator=g) * 200
    wh = torch.rand(n, 2, generator=g) * 60
    boxes = torch.cat([xy, xy + wh], 1)
    return boxes.round().to(dtype) if seed % 2 else boxes.to(dtype)  # integer-valued: exact ties


@pytest.mark.parametrize("n", [1, 2, 50, 600])
@pytest.mark.parametrize("thr", [0.0, 0.3, 0.5, 0.7, 1.0])
@pytest.mark.parametrize("seed", [0, 1])
def test_nms_matches_torchvision(n: int, thr: float, seed: int) -> None:
    g = torch.Generator().manual_seed(seed + 100)
    boxes = _random_boxes(n, seed)
    scores = torch.rand(n, generator=g)
    tied = (scores * 4).round() / 4  # many exact ties: order must follow the index
    for s in (scores, tied):
        assert torch.equal(ours.nms(boxes, s, thr), tv_ops.nms(boxes, s, thr))
        idxs = torch.randint(0, 3, (n,), generator=g)
        assert torch.equal(ours.batched_nms(boxes, s, idxs, thr), tv_ops.batched_nms(boxes, s, idxs, thr))


def test_nms_edge_cases() -> None:
    empty = torch.zeros(0, 4)
    got = ours.batched_nms(empty, torch.zeros(0), torch.zeros(0, dtype=torch.int64), 0.7)
    assert got.dtype == torch.int64 and got.shape == (0,)
    assert ours.nms(empty, torch.zeros(0), 0.5).shape == (0,)
    # identical boxes with identical scores: the first one wins
    same = torch.tensor([[0.0, 0, 10, 10]] * 5)
    assert ours.nms(same, torch.ones(5), 0.5).tolist() == [0]
    # degenerate (zero-area) boxes give 0/0 = NaN IoU and are never suppressed, as in torchvision
    flat = torch.tensor([[5.0, 5, 5, 9], [5.0, 5, 5, 9], [0, 0, 3, 3]])
    sc = torch.tensor([0.9, 0.8, 0.7])
    assert torch.equal(ours.nms(flat, sc, 0.5), tv_ops.nms(flat, sc, 0.5))
    # IoU equal to float32(thr): torchvision compares in double, so 0.6f > 0.6 suppresses while
    # 0.7f > 0.7 does not; a naive float32 comparison gets the first one wrong.
    two = torch.tensor([1.0, 0.5])
    for height, thr in [(6, 0.6), (7, 0.7), (6, 0.60000001), (7, 0.69999999), (3, 0.3), (1, 0.1)]:
        a = torch.tensor([[0.0, 0, 10, 10], [0.0, 0, 10, height]])
        assert torch.equal(ours.nms(a, two, thr), tv_ops.nms(a, two, thr)), (height, thr)
    assert ours.nms(torch.tensor([[0.0, 0, 10, 10], [0.0, 0, 10, 6]]), two, 0.6).tolist() == [0]
    # float64 and integer boxes
    b64 = _random_boxes(300, 3, torch.float64)
    s64 = torch.rand(300, dtype=torch.float64, generator=torch.Generator().manual_seed(9))
    assert torch.equal(ours.nms(b64, s64, 0.5), tv_ops.nms(b64, s64, 0.5))
    bint = _random_boxes(300, 5).long()
    assert torch.equal(ours.nms(bint, s64.float(), 0.5), tv_ops.nms(bint.float(), s64.float(), 0.5))


def test_batched_nms_large_and_fast() -> None:
    """Beyond 1000 boxes torchvision switches to a per-category loop; still the same result."""
    g = torch.Generator().manual_seed(11)
    for n, spread in [(3000, 200.0), (4000, 30.0)]:  # sparse, and heavy (AMG-like) suppression
        xy = torch.rand(n, 2, generator=g) * spread
        boxes = torch.cat([xy, xy + 20 + torch.rand(n, 2, generator=g) * 40], 1)
        scores = torch.randperm(n, generator=g).float() / n  # unique: torchvision's order is defined
        idxs = torch.randint(0, 3, (n,), generator=g)
        t0 = time.perf_counter()
        got = ours.batched_nms(boxes, scores, idxs, 0.7)
        elapsed = time.perf_counter() - t0
        assert torch.equal(got, tv_ops.batched_nms(boxes, scores, idxs, 0.7))
        assert torch.equal(ours.nms(boxes, scores, 0.7), tv_ops.nms(boxes, scores, 0.7))
        assert elapsed < 2.0, elapsed


def test_batched_nms_large_with_ties() -> None:
    """torchvision's per-category path (> 1000 boxes) orders tied scores with an unstable sort;
    ours keeps the lower index first. Same kept set and same score sequence."""
    g = torch.Generator().manual_seed(12)
    n = 2500
    boxes = _random_boxes(n, 13)
    scores = torch.randint(0, 50, (n,), generator=g).float()
    idxs = torch.randint(0, 4, (n,), generator=g)
    got = ours.batched_nms(boxes, scores, idxs, 0.5)
    ref = tv_ops.batched_nms(boxes, scores, idxs, 0.5)
    assert sorted(got.tolist()) == sorted(ref.tolist())
    assert torch.equal(scores[got], scores[ref])
    ranks = [(-scores[i].item(), i) for i in got.tolist()]
    assert ranks == sorted(ranks)  # decreasing score, ties by increasing index


def test_no_torchvision_import() -> None:
    src = pathlib.Path(ours.__file__).read_text()
    for node in ast.walk(ast.parse(src)):
        if isinstance(node, ast.Import):
            assert not any(a.name.startswith("torchvision") for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            assert not (node.module or "").startswith("torchvision")
