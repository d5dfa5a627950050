"""Prompted segmentation through SAM / Predictor: the seed's call shapes, parity with Meta's
SamPredictor, embeddings, sources and bad input (SPEC §3, §4, §6, §9)."""

from __future__ import annotations

import dataclasses
import gc
import json
import warnings
import weakref
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from PIL import Image

from conftest import SMALL_VIT, meta_twin, random_sam, test_image
from segany import SAM, Predictor, Results
from segany.checkpoints import load_model
from segany.engine.transforms import binary_masks_to_logits
from segany.models import build_model
from segany.errors import ConfigError, ImageError, ImageNotFoundError, PromptError, SegAnyError, SkippedImageWarning

H, W = 180, 240


def _check(results, n_masks: int, shape=(H, W)) -> Results:
    assert isinstance(results, list) and len(results) == 1
    r = results[0]
    assert r.masks.data.shape == (n_masks, *shape) and r.masks.data.dtype == torch.bool
    assert r.boxes.conf.shape == (n_masks,)
    assert r.low_res_logits.shape == (n_masks, 64, 64)
    return r


def test_seed_examples_sam(model, img_path):
    # SAM("sam_b.pt") examples of the seed, with a random-weight checkpoint standing in.
    r = _check(model(img_path, bboxes=[40, 40, 120, 110]), 1)
    assert r.boxes.cls.tolist() == [0]
    _check(model(points=[200, 100], labels=[1]), 1)  # no source: the last image
    r = _check(model(points=[[40, 37], [200, 37]], labels=[1, 1]), 2)
    assert r.boxes.cls.tolist() == [0, 1]
    _check(model(points=[[[40, 37], [200, 37]]], labels=[[1, 1]]), 1)
    _check(model(points=[[[40, 37], [200, 37]]], labels=[[1, 0]]), 1)
    _check(model(img_path, points=[[40, 37], [200, 37]], labels=[[1, 1]]), 2)  # labels as written in the seed
    r = _check(model(img_path, bboxes=[[10, 10, 100, 90], [120, 40, 230, 170]]), 2)
    assert r.boxes.cls.tolist() == [0, 1]
    r = _check(model(img_path, points=[200, 100], multimask_output=True), 3)
    assert r.boxes.cls.tolist() == [0, 0, 0]
    assert torch.all(r.boxes.conf[:-1] >= r.boxes.conf[1:]), "multimask outputs are best first"
    _check(model(img_path, masks=r.low_res_logits[:1]), 1)  # refinement with the previous logits
    _check(model(img_path, bboxes=[[10, 10, 100, 90]], points=[[[50, 50], [60, 60]]], labels=[[1, 0]]), 1)


def test_seed_examples_predictor(small_ckpt, img_path):
    overrides = dict(conf=0.25, task="segment", mode="predict", imgsz=256, model=small_ckpt)
    predictor = Predictor(overrides=overrides)
    predictor.set_image(img_path)
    predictor.set_image(cv2.imread(img_path))
    predictor.set_image(Image.open(img_path))
    _check(predictor(bboxes=[40, 40, 120, 110]), 1)
    _check(predictor(points=[200, 100], labels=[1]), 1)
    _check(predictor(points=[[40, 37], [200, 37]], labels=[1, 1]), 2)
    _check(predictor(points=[[[40, 37], [200, 37]]], labels=[[1, 0]]), 1)
    assert predictor.get_image_embedding().shape == (1, 256, 16, 16)
    predictor.reset_image()
    with pytest.raises(PromptError, match="set_image"):
        predictor(bboxes=[40, 40, 120, 110])


def _meta_predict(ref, img_bgr, **kw):
    from segment_anything import SamPredictor

    p = SamPredictor(ref)
    p.set_image(img_bgr[..., ::-1].copy())
    return p


@pytest.mark.parametrize("shape", [(H, W), (300, 140), (256, 256)])
def test_parity_with_meta_sam_predictor(tmp_path, shape):
    h, w = shape
    ours_model = random_sam(SMALL_VIT, seed=11)
    ref = meta_twin(ours_model, SMALL_VIT)
    path = tmp_path / "m.pth"
    torch.save(ours_model.state_dict(), path)
    model = SAM(str(path))
    img = test_image(h, w, seed=4)
    img_file = tmp_path / "img.png"
    cv2.imwrite(str(img_file), img)
    meta = _meta_predict(ref, img)
    border = [[0, 0], [w - 1, h - 1], [w, h / 2]]  # points on and near the border
    cases = [
        dict(box=np.array([0.1 * w, 0.2 * h, 0.6 * w, 0.9 * h])),
        dict(point_coords=np.array([[0.5 * w, 0.5 * h]]), point_labels=np.array([1])),
        dict(point_coords=np.array(border, float), point_labels=np.array([1, 0, 1])),
        dict(point_coords=np.array([[0.3 * w, 0.3 * h]]), point_labels=np.array([0]),
             box=np.array([0, 0, w, h])),
    ]
    for multimask in (False, True):
        for case in cases:
            m_masks, m_iou, m_low = meta.predict(multimask_output=multimask, **case)
            kw = {}
            if "box" in case:
                kw["bboxes"] = case["box"]
            if "point_coords" in case:
                kw["points"], kw["labels"] = case["point_coords"][None], case["point_labels"][None]
            r = model(str(img_file), multimask_output=multimask, **kw)[0]
            order = np.argsort(-m_iou, kind="stable")
            assert np.abs(r.boxes.conf.numpy() - m_iou[order]).max() <= 1e-4
            assert np.abs(r.low_res_logits.numpy() - m_low[order]).max() <= 1e-4
            assert (r.masks.data.numpy() != m_masks[order]).mean() <= 1e-4, case
            # refinement: the low-res logits fed back as a mask prompt
            m2, iou2, _ = meta.predict(mask_input=m_low[order][:1], multimask_output=False, **case)
            r2 = model(masks=r.low_res_logits[:1], multimask_output=False, **kw)[0]
            assert np.abs(r2.boxes.conf.numpy() - iou2).max() <= 1e-4
            assert (r2.masks.data.numpy() != m2).mean() <= 1e-4


def test_parity_several_boxes_with_meta_predict_torch(tmp_path):
    ours_model = random_sam(SMALL_VIT, seed=12)
    ref = meta_twin(ours_model, SMALL_VIT)
    img = test_image(H, W, seed=5)
    meta = _meta_predict(ref, img)
    boxes = np.array([[10, 10, 100, 90], [120, 40, 230, 170], [0, 0, W, H], [50, 60, 51, 61]], float)
    tb = meta.transform.apply_boxes_torch(torch.as_tensor(boxes), (H, W)).float()
    m_masks, m_iou, m_low = meta.predict_torch(None, None, boxes=tb, multimask_output=False)
    predictor = Predictor(model=ours_model, config=SMALL_VIT)
    predictor.set_image(img)
    r = predictor(bboxes=boxes)[0]
    assert r.boxes.cls.tolist() == [0, 1, 2, 3]
    assert (r.boxes.conf - m_iou[:, 0]).abs().max() <= 1e-4
    assert (r.low_res_logits - m_low[:, 0]).abs().max() <= 1e-4
    assert (r.masks.data != m_masks[:, 0]).float().mean() <= 1e-4


def test_prompt_call_reuses_the_embedding(model, img_path, monkeypatch):
    model(img_path, bboxes=[40, 40, 120, 110])
    monkeypatch.setattr(model.model.image_encoder, "forward", lambda x: pytest.fail("encoder ran again"))
    _check(model(points=[100, 100]), 1)


def test_conf_never_drops_prompted_masks(model, img_path):
    r = model(img_path, bboxes=[[10, 10, 100, 90], [120, 40, 230, 170]], conf=0.999)[0]
    assert len(r) == 2


def test_binary_mask_prompt_at_image_size(model, img_path):
    mask = np.zeros((H, W), bool)
    mask[40:100, 50:120] = True
    _check(model(img_path, masks=mask), 1)
    _check(model(img_path, masks=np.stack([mask, ~mask])), 2)
    # On a large image a thin object keeps its share of each low-res cell (area averaging), and
    # bool masks stay one byte a pixel until then.
    pred = model.predictor
    big = np.zeros((3000, 4000), bool)
    big[:, 2000:2040] = True
    pred.set_image(np.full((3000, 4000, 3), 100, np.uint8))
    for given in (big, big.astype(np.float32), torch.from_numpy(big)):
        parsed = pred._parse((3000, 4000), dict(bboxes=None, points=None, labels=None, masks=given))
        assert parsed.masks.dtype in (np.uint8, np.float32) and not parsed.masks_are_logits
        low = model.model.prompt_encoder.mask_input_size[0]
        logits = binary_masks_to_logits(parsed.masks, pred.image.input_size, model.model.img_size, (low, low))
        assert logits.shape == (1, 1, low, low) and int((logits > 0).sum()) == low * 3 // 4


def test_embedding_saved_and_loaded_in_a_second_predictor(small_ckpt, img_path, tmp_path):
    a = Predictor(overrides=dict(model=small_ckpt))
    a.set_image(img_path)
    expected = a(bboxes=[40, 40, 120, 110])[0]
    a.save_embedding(tmp_path / "emb.pt")
    net, cfg = load_model(small_ckpt)
    net.image_encoder.forward = lambda x: pytest.fail("the second predictor must not encode")
    b = Predictor(model=net, config=cfg)
    b.load_embedding(tmp_path / "emb.pt")
    got = b(bboxes=[40, 40, 120, 110])[0]
    assert got.path == expected.path == img_path
    assert torch.equal(got.masks.data, expected.masks.data)
    assert torch.allclose(got.boxes.conf, expected.boxes.conf)


def test_bad_embedding_files_are_refused_and_leave_the_predictor_as_it_was(small_ckpt, img_path, tmp_path):
    a = Predictor(overrides=dict(model=small_ckpt))
    a.set_image(img_path)
    a.save_embedding(tmp_path / "emb.pt")
    expected = a(bboxes=[40, 40, 120, 110])[0]
    data = torch.load(tmp_path / "emb.pt", weights_only=True)
    data["features"] = torch.zeros(1, 8, 4, 4)  # another model's embedding
    torch.save(data, tmp_path / "other.pt")
    torch.save([1, 2], tmp_path / "list.pt")
    with pytest.raises(SegAnyError, match="computed for another model.*set_image"):
        a.load_embedding(tmp_path / "other.pt")
    with pytest.raises(SegAnyError, match="not an embedding saved by"):
        a.load_embedding(tmp_path / "list.pt")
    with pytest.raises(FileNotFoundError, match="embedding file not found"):
        a.load_embedding(tmp_path / "missing.pt")
    assert torch.equal(a(bboxes=[40, 40, 120, 110])[0].masks.data, expected.masks.data)


def test_sources_list_stream_directory(model, tmp_path):
    paths = []
    for i, (h, w) in enumerate([(120, 160), (200, 90), (64, 64)]):
        p = tmp_path / "imgs" / f"im{i}.png"
        p.parent.mkdir(exist_ok=True)
        cv2.imwrite(str(p), test_image(h, w, seed=i))
        paths.append(str(p))
    res = model(paths, bboxes=[5, 5, 50, 50], batch=2)
    assert [r.orig_shape for r in res] == [(120, 160), (200, 90), (64, 64)]
    single = [model(p, bboxes=[5, 5, 50, 50])[0] for p in paths]
    for a, b in zip(res, single):
        assert (a.masks.data != b.masks.data).float().mean() < 1e-3
    gen = model(str(tmp_path / "imgs"), bboxes=[5, 5, 50, 50], stream=True)
    assert not isinstance(gen, list)
    assert [r.path for r in gen] == paths
    arr = [cv2.imread(p) for p in paths[:2]]
    assert len(model(arr, points=[10, 10])) == 2
    t = torch.from_numpy(cv2.imread(paths[0])[..., ::-1].copy()).permute(2, 0, 1).float() / 255
    assert model(t, points=[10, 10])[0].orig_shape == (120, 160)


@pytest.mark.parametrize("kwargs,match", [
    (dict(labels=[1]), "labels were given without points"),
    (dict(points=[[10, 10], [20, 20]], labels=[1, 1, 0]), "labels do not match points"),
    (dict(points=[[[[10, 10]]]]), "points must be"),
    (dict(points=[[[10, 10], [20, 20]], [[30, 30]]], labels=[[1, 1], [1]]), "different lengths"),
    (dict(bboxes=[1, 2, 3]), "bboxes must be"),
    (dict(points=[float("nan"), 10]), "NaN"),
    (dict(bboxes=[10, 10, float("inf"), 50]), "NaN or infinite"),
    (dict(bboxes=[100, 10, 50, 50]), "x2 < x1"),
    (dict(points=[5000, 10]), "outside"),
    (dict(bboxes=[5000, 5000, 6000, 6000]), "outside"),
    (dict(bboxes=[-10, -10, 0, 0]), "outside"),  # touches a corner from outside: nothing left after clipping
    (dict(points=[10, 10], labels=[2]), "1 \\(positive\\) or 0"),
    (dict(bboxes=[[1, 1, 20, 20], [2, 2, 30, 30]], points=[[[5, 5]]]), "different numbers of objects"),
    (dict(masks=np.zeros((7, 9))), "masks must be"),
])
def test_bad_prompts_are_clear_errors_and_leave_the_predictor_usable(model, img_path, kwargs, match):
    model(img_path, bboxes=[40, 40, 120, 110])
    with pytest.raises(PromptError, match=match):
        model(**kwargs)
    with pytest.raises(PromptError, match=match):
        model(img_path, **kwargs)
    _check(model(bboxes=[40, 40, 120, 110]), 1)


def test_box_partly_outside_is_clipped_with_a_warning(model, img_path):
    with pytest.warns(UserWarning, match="clipped") as record:
        _check(model(img_path, bboxes=[-20, -20, 100, 500]), 1)
    assert record[0].filename == __file__  # the warning points at the caller's line, not into segany
    _check(model(img_path, bboxes=[50, 50, 50, 80]), 1)  # zero width inside the image: a valid prompt


def test_an_object_of_negative_points_only_is_warned_about(model, img_path):
    import warnings

    with pytest.warns(UserWarning, match="object 1 of 2 has only negative points"):
        _check(model(img_path, points=[[40, 40], [100, 100]], labels=[[1, 0]]), 2)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        _check(model(img_path, points=[[[40, 40], [100, 100]]], labels=[[1, 0]]), 1)  # one object, two points
        _check(model(img_path, bboxes=[30, 30, 120, 110], points=[[100, 100]], labels=[0]), 1)  # box + negative


def test_masks_read_the_unpadded_logits_and_the_rest_is_made_when_read(model, img_path):
    # A non-square image: on a CPU the decoder upscales only what the masks read; the whole low-res
    # logits come when first read, equal to a whole decode of the same prompts.
    pred = model.predictor
    boxes = [[40, 40, 120, 110], [10, 20, 60, 90]]
    assert not callable(model(img_path, bboxes=boxes)[0]._low_res)  # images passed as sources: made at once
    r = model(bboxes=boxes)[0]  # a prompt on the set image
    assert callable(r._low_res)
    parsed = pred._parse((H, W), dict(bboxes=boxes, points=None, labels=None, masks=None))
    full, _ = pred.decode(pred.image, parsed, False)
    top, _ = pred.decode(pred.image, parsed, False, extent=pred.model.low_res_extent(pred.image.input_size))
    assert top.shape[-2] < full.shape[-2] and torch.equal(top, full[..., : top.shape[-2], : top.shape[-1]])
    assert torch.equal(r.masks.data, pred.logits_to_masks(pred.image, full).flatten(0, 1))
    assert torch.equal(r.low_res_logits, full.flatten(0, 1)) and not callable(r._low_res)
    assert torch.equal(r[1:].low_res_logits, full.flatten(0, 1)[1:])
    # Unread, they are made when the predictor's image changes: from the image and the weights
    # they belong to, and no result keeps an embedding alive after that.
    r = model(bboxes=boxes)[0]
    state = weakref.ref(pred.image)
    model.predictor.set_image(test_image(H, W, seed=5))
    assert not callable(r._low_res) and torch.equal(r.low_res_logits, full.flatten(0, 1))
    gc.collect()
    assert state() is None
    r = model(bboxes=boxes)[0]
    model.predictor.reset_image()
    assert not callable(r._low_res)


def test_logits_made_when_read_are_refused_once_the_weights_changed(model, img_path):
    # A second predictor on the same weights (as README shares them between threads) is not reset
    # when they change: the deferred logits would come from other weights than the masks.
    import pickle

    from segany.errors import WeightsChangedError

    other = Predictor(model=model.model, config=model.config)
    other.set_image(img_path)
    kept, unread, dropped = (other(bboxes=[40, 40, 120, 110])[0] for _ in range(3))
    full = kept.low_res_logits.clone()  # read before the change: made, and kept
    other.set_image(test_image(H, W, seed=7))  # `dropped`'s are made now, while the weights are those
    assert callable(unread._low_res) is False and torch.equal(dropped.low_res_logits, full)
    other.set_image(img_path)
    unread = other(bboxes=[40, 40, 120, 110])[0]
    state = model.model.state_dict()
    try:
        with torch.no_grad():
            model.model.mask_decoder.iou_token.weight.add_(1.0)  # in place, as an optimizer step
        with pytest.raises(WeightsChangedError, match="weights have changed since the prediction"):
            unread.low_res_logits
        assert torch.equal(kept.low_res_logits, full)  # made before: unaffected
        other.set_image(test_image(H, W, seed=7))  # the image changing does not fail either
        with pytest.raises(WeightsChangedError):
            unread.low_res_logits
        assert pickle.loads(pickle.dumps(unread)).low_res_logits is None and len(unread) == 1
        # The masks stay usable: selections and copies work, their logits are refused when read
        for copy in (unread[0], next(iter(unread)), unread[unread.boxes.conf > -1], unread.cpu(), unread.numpy()):
            assert np.array_equal(np.asarray(copy.masks.data), unread.masks.data.numpy())
            with pytest.raises(WeightsChangedError):
                copy.low_res_logits
    finally:
        model.model.load_state_dict(state)


def test_very_elongated_images_keep_a_pixel_of_short_side(model):
    # 3000 × 5: the short side resized to the model's input size would round to 0 pixels.
    img = np.full((5, 3000, 3), 128, np.uint8)
    r = model(img, bboxes=[0, 0, 100, 3])[0]
    assert r.masks.data.shape == (1, 5, 3000)


def test_bad_images_and_options(model, tmp_path, small_ckpt):
    empty = tmp_path / "empty.jpg"
    empty.write_bytes(b"")
    corrupt = tmp_path / "corrupt.jpg"
    corrupt.write_bytes(np.random.default_rng(0).integers(0, 255, 500, dtype=np.uint8).tobytes())
    with pytest.raises(ImageNotFoundError, match="missing.jpg"):
        model(str(tmp_path / "missing.jpg"), bboxes=[1, 1, 5, 5])
    with pytest.raises(ImageError, match="empty"):
        model(str(empty), bboxes=[1, 1, 5, 5])
    with pytest.raises(ImageError, match="corrupt.jpg"):
        model(str(corrupt), bboxes=[1, 1, 5, 5])
    with pytest.raises(ConfigError, match="Did you mean 'multimask_output'"):
        model(str(corrupt), bboxes=[1, 1, 5, 5], multimask_ouput=True)
    with pytest.raises(ConfigError, match="unknown option 'confidence'"):
        Predictor(overrides=dict(model=small_ckpt, confidence=0.3))
    with pytest.raises(PromptError, match="set_image"):
        Predictor(overrides=dict(model=small_ckpt))(points=[1, 1])


@pytest.mark.parametrize("kwargs,match", [
    (dict(multimask_output="no"), "multimask_output='no': expected true or false"),
    (dict(half="yes"), "half='yes': expected true or false"),
    (dict(compile="no"), "expected true or false"),
    (dict(batch=-1), "batch=-1: expected an integer >= 1"),
    (dict(batch=1.5), "batch=1.5: expected an integer"),
    (dict(vid_stride=2.5), "vid_stride=2.5: expected an integer"),
    (dict(imgsz="abc"), "imgsz='abc': expected an integer"),
    (dict(conf="high"), "conf='high': expected a number"),
    (dict(conf=1.5), "conf=1.5: expected a predicted IoU"),
    (dict(task="detect"), "only does task='segment'"),
    (dict(points_per_side=8, points_stride=8), "same option"),
])
def test_bad_option_values_fail_in_the_constructor_and_in_a_call(model, img_path, small_ckpt, kwargs, match):
    with pytest.raises(ConfigError, match=match):
        Predictor(overrides=dict(model=small_ckpt, **kwargs))
    with pytest.raises(ConfigError, match=match):
        model(img_path, bboxes=[40, 40, 120, 110], **kwargs)
    _check(model(img_path, bboxes=[40, 40, 120, 110], batch=np.int64(2), multimask_output=np.bool_(False)), 1)


def test_values_the_model_cannot_take_fail_in_the_constructor(small_ckpt):
    with pytest.raises(ConfigError, match="imgsz=1024: this model works at imgsz="):
        Predictor(overrides=dict(model=small_ckpt, imgsz=1024))
    with pytest.raises(ConfigError, match="points_stride"):
        Predictor(overrides=dict(model=small_ckpt, points_stride=0))


def test_save_options_write_a_run_folder_from_python(model, img_path, tmp_path):
    project = tmp_path / "runs"
    r = model(img_path, bboxes=[40, 40, 120, 110], save=True, save_txt=True, project=str(project), name="p")[0]
    folder = project / "p"
    assert cv2.imread(str(folder / "scene.png")).shape == (H, W, 3)
    assert json.loads((folder / "scene.json").read_text())["annotations"][0]["segmentation"]["size"] == [H, W]
    assert (folder / "labels" / "scene.txt").read_text().strip().split()[0] == "0"
    model(img_path, bboxes=[40, 40, 120, 110], save=True, project=str(project), name="p")
    assert (project / "p2" / "scene.png").is_file()
    with pytest.raises(PromptError):  # a call that fails writes nothing, and makes no folder
        model(img_path, bboxes=[1, 2, 3], save=True, project=str(project), name="p")
    assert sorted(p.name for p in project.iterdir()) == ["p", "p2"]
    assert len(r) == 1
    # Two runs started before either writes get folders of their own (not both p3).
    first = model([img_path] * 2, bboxes=[40, 40, 120, 110], save=True, project=str(project), name="p", stream=True)
    second = model([img_path], bboxes=[40, 40, 120, 110], save=True, project=str(project), name="p", stream=True)
    next(first), list(second), list(first)
    assert sorted(p.name for p in project.iterdir()) == ["p", "p2", "p3", "p4"]
    assert [len(list((project / n).glob("*.json"))) for n in ("p3", "p4")] == [2, 1]


def test_a_failed_call_leaves_the_current_image_and_prompts_report_their_own_time(model, img_path, tmp_path):
    pred = model.predictor
    pred.set_image(img_path)
    current = pred.image
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"not a png")
    for batch in (1, 2):
        with pytest.raises(ImageError):
            model([test_image(H, W, seed=1), str(bad)], points=[50, 60], batch=batch)
        assert pred.image is current  # whatever the batch size
        with pytest.raises(PromptError):
            model([test_image(H, W, seed=1), test_image(20, 30)], points=[100, 80], batch=batch)
        assert pred.image is current
    pred.image = dataclasses.replace(current, preprocess_ms=1e6, encode_ms=1e6)  # a very slow earlier encode
    r = model(points=[50, 60])[0]  # a prompt on the set image reports only its decode
    assert r.speed["preprocess"] == 0.0 and 0 < r.speed["inference"] < 1e5
    assert model(img_path, points=[50, 60])[0].speed["preprocess"] > 0  # an image given: its encode counts


def test_batch_prompt_errors_name_the_image_and_imgsz_takes_a_square_pair(model, img_path):
    with pytest.raises(PromptError, match=r"^image1: point .* outside the 30x20 image"):
        model([test_image(H, W), test_image(20, 30)], points=[100, 80])
    size = model.model.img_size
    assert len(model(img_path, bboxes=[40, 40, 120, 110], imgsz=[size, size])[0]) == 1
    with pytest.raises(ConfigError, match="square input"):
        model(img_path, bboxes=[40, 40, 120, 110], imgsz=[size, size // 2])


def test_many_results_without_stream_warn(model, img_path, monkeypatch):
    import segany.engine.predictor as predictor_module

    monkeypatch.setattr(predictor_module, "MANY_RESULTS", 2)
    with pytest.warns(UserWarning, match="results of 3 images are kept in memory.*stream=True"):
        assert len(model([img_path] * 3, bboxes=[40, 40, 120, 110])) == 3
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a stream, or few images: no warning
        assert len(list(model([img_path] * 3, bboxes=[40, 40, 120, 110], stream=True))) == 3
        assert len(model([img_path] * 2, bboxes=[40, 40, 120, 110])) == 2


def test_verbose_prints_a_line_per_image_and_the_speed(model, img_path, capsys):
    model(img_path, bboxes=[40, 40, 120, 110])  # the Python default is quiet
    assert capsys.readouterr().out == ""
    model([img_path, img_path], bboxes=[[40, 40, 120, 110], [10, 10, 50, 50]], verbose=True)
    lines = capsys.readouterr().out.splitlines()
    h, w = model.model.input_size(H, W)
    assert [line.split(",")[0] for line in lines[:2]] == [f"image {i}/2 scene.png: {h}x{w} 2 masks" for i in (1, 2)]
    assert lines[2].startswith("Speed: ") and lines[2].endswith("per image; 2 images, 4 masks")
    model(points=[50, 60], verbose=True)  # the current image: one of one
    assert capsys.readouterr().out.startswith(f"image 1/1 scene.png: {h}x{w} 1 mask, ")
    folder = Path(img_path).parent / "folder"
    folder.mkdir()
    cv2.imwrite(str(folder / "scene.png"), test_image(H, W))
    (folder / "broken.jpg").write_bytes(b"not a jpeg")  # listed, unreadable: skipped, and not counted
    with pytest.warns(SkippedImageWarning):
        model(folder, bboxes=[40, 40, 120, 110], verbose=True)
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("image 1/1 scene.png: ") and lines[1].endswith("1 image, 1 mask")


def test_compile_matches_eager():
    # torch.compile of the encoder (issue 10): same masks as the eager path. The tiniest config:
    # compiling on CPU takes tens of seconds.
    from test_train import TINY

    torch.manual_seed(0)
    pred = Predictor(overrides=dict(device="cpu"), model=build_model(TINY))
    img = test_image(100, 120)
    eager = pred(source=img, bboxes=[10, 10, 80, 70])[0]
    compiled = pred(source=img, bboxes=[10, 10, 80, 70], compile=True)[0]
    assert pred._compiled is not None and pred._compiled[0] is pred.model
    assert torch.allclose(compiled.low_res_logits, eager.low_res_logits, atol=1e-4)
    assert torch.equal(compiled.masks.data, eager.masks.data)
