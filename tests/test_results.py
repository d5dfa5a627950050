"""Results / Masks / Boxes on synthetic masks: shapes, boxes, polygons, exports, plotting."""

from __future__ import annotations

import json
import os
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from pycocotools import mask as mask_utils

from segany.engine.polygons import mask_contours, merge_contours
from segany.engine.results import Boxes, Masks, Results

H, W = 120, 160


def synthetic_image() -> np.ndarray:
    """A smooth BGR gradient, so plotted colours always differ from the original."""
    y, x = np.mgrid[0:H, 0:W]
    return np.stack([x * 255 // W, y * 255 // H, np.full_like(x, 60)], -1).astype(np.uint8)


def synthetic_masks() -> np.ndarray:
    """(5, H, W): rectangle, circle, two-part mask, empty mask, rectangle touching the border."""
    m = np.zeros((5, H, W), bool)
    m[0, 10:40, 20:70] = True  # rows 10..39, cols 20..69
    cv2.circle(mv := np.zeros((H, W), np.uint8), (110, 60), 25, 1, -1)
    m[1] = mv.astype(bool)
    m[2, 70:100, 10:40] = True
    m[2, 80:110, 60:90] = True
    m[4, 100:, 130:] = True
    return m


@pytest.fixture
def res() -> Results:
    masks = synthetic_masks()
    return Results(
        orig_img=synthetic_image(),
        path="synthetic.jpg",
        masks=torch.from_numpy(masks),
        scores=torch.tensor([0.9, 0.8, 0.7, 0.6, 0.5]),
        low_res_logits=torch.randn(5, 256, 256),
        speed={"preprocess": 1.0, "inference": 2.0, "postprocess": 3.0},
    )


def rasterise(poly: np.ndarray) -> np.ndarray:
    out = np.zeros((H, W), np.uint8)
    if len(poly):
        cv2.fillPoly(out, [np.round(poly).astype(np.int32).reshape(-1, 1, 2)], 1)
    return out.astype(bool)


def iou(a: np.ndarray, b: np.ndarray) -> float:
    return (a & b).sum() / max((a | b).sum(), 1)


def test_attributes_shapes_dtypes(res: Results) -> None:
    assert len(res) == 5 and res.orig_shape == (H, W) and res.path == "synthetic.jpg"
    assert res.masks.data.shape == (5, H, W) and res.masks.data.dtype == torch.bool
    assert res.masks.shape == (5, H, W) and len(res.masks) == 5
    assert res.boxes.data.shape == (5, 6) and res.boxes.data.dtype == torch.float32
    assert res.boxes.xyxy.shape == (5, 4) and res.boxes.xywh.shape == (5, 4)
    assert torch.allclose(res.boxes.conf, torch.tensor([0.9, 0.8, 0.7, 0.6, 0.5]))
    assert res.boxes.cls.tolist() == [0, 1, 2, 3, 4]  # prompt index by default
    assert res.names == {i: str(i) for i in range(5)}
    assert res.speed == {"preprocess": 1.0, "inference": 2.0, "postprocess": 3.0}
    assert res.low_res_logits.shape == (5, 256, 256)
    assert res.records is None
    assert all(p.dtype == np.float32 and p.ndim == 2 and p.shape[1] == 2 for p in res.masks.xy)
    assert res.masks.xy[3].shape == (0, 2)  # empty mask → empty polygon
    for p, pn in zip(res.masks.xy, res.masks.xyn):
        assert np.allclose(pn * [W, H], p, atol=1e-4)
        assert pn.size == 0 or (pn.min() >= 0 and pn.max() <= 1)
    assert res.verbose() == "5 masks" and "5 masks" in repr(res)


def test_boxes_pixel_edge_convention(res: Results) -> None:
    xyxy = res.boxes.xyxy.tolist()
    assert xyxy[0] == [20, 10, 70, 40]  # x2 = max x + 1
    assert xyxy[1] == [85, 35, 136, 86]
    assert xyxy[2] == [10, 70, 90, 110]
    assert xyxy[3] == [0, 0, 0, 0]  # empty mask
    assert xyxy[4] == [130, 100, 160, 120]  # touches the border: x2 == W
    assert res.boxes.xywh[0].tolist() == [45, 25, 50, 30]
    assert torch.allclose(res.boxes.xyxyn[4], torch.tensor([130 / W, 100 / H, 1.0, 1.0]))
    assert res.boxes.xywhn.shape == (5, 4)


def test_indexing(res: Results) -> None:
    one = res[1]
    assert isinstance(one, Results) and len(one) == 1 and one.masks.data.shape == (1, H, W)
    assert one.boxes.cls.tolist() == [1] and one.low_res_logits.shape == (1, 256, 256)
    assert torch.equal(res[-1].masks.data[0], res.masks.data[4])
    sub = res[1:3]
    assert len(sub) == 2 and sub.boxes.conf.tolist() == pytest.approx([0.8, 0.7])
    picked = res[[0, 4]]
    assert picked.boxes.cls.tolist() == [0, 4]
    kept = res[res.boxes.conf > 0.65]
    assert len(kept) == 3 and kept.names == res.names
    assert len(res[2:2]) == 0 and res[2:2].masks.data.shape == (0, H, W)
    with pytest.raises(IndexError):
        res[7]
    # Polygons of a subset are the polygons of the same masks.
    assert np.array_equal(res[2].masks.xy[0], res.masks.xy[2])


def test_cpu_numpy_to(res: Results) -> None:
    n = res.numpy()
    assert isinstance(n.masks.data, np.ndarray) and n.masks.data.dtype == np.bool_
    assert isinstance(n.boxes.data, np.ndarray) and n.boxes.xywh.shape == (5, 4)
    assert isinstance(n.low_res_logits, np.ndarray)
    assert np.array_equal(n.boxes.xyxy, res.boxes.xyxy.numpy())
    assert len(n[1:3]) == 2 and n.to_coco()[0]["bbox"] == res.to_coco()[0]["bbox"]
    c = res.cpu()
    assert isinstance(c.masks.data, torch.Tensor) and c.masks.data.device.type == "cpu"
    t = n.to("cpu")
    assert isinstance(t.masks.data, torch.Tensor) and torch.equal(t.masks.data, res.masks.data)
    assert isinstance(res.masks.data, torch.Tensor)  # the original is unchanged


def test_polygons_multi_part_and_contours(res: Results) -> None:
    masks = synthetic_masks()
    assert len(res.masks.contours(2)) == 2  # two separate outer contours
    assert len(res.masks.contours(0)) == 1 and res.masks.contours(3) == []
    for i in (0, 1, 2, 4):
        back = rasterise(res.masks.xy[i])
        assert iou(back, masks[i]) >= 0.9, i
        assert not (masks[i] & ~back).any(), i  # every part is recovered


def test_merge_many_parts_recovers_every_part() -> None:
    m = np.zeros((H, W), bool)
    rng = np.random.default_rng(0)
    for _ in range(12):
        y, x = rng.integers(0, H - 6), rng.integers(0, W - 6)
        m[y : y + 5, x : x + 5] = True
    m[0, 0] = m[H - 1, W - 1] = True  # single pixels in the corners
    poly = merge_contours(mask_contours(m))
    assert not (m & ~rasterise(poly)).any()
    assert merge_contours([]).shape == (0, 2)


@pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")  # pycocotools decode
def test_to_coco_rle_roundtrip(res: Results) -> None:
    anns = res.to_coco(image_id=7)
    json.dumps(anns)  # counts decoded to str
    masks = synthetic_masks()
    assert [a["id"] for a in anns] == [1, 2, 3, 4, 5]
    for i, a in enumerate(anns):
        assert a["image_id"] == 7 and a["category_id"] == i and a["iscrowd"] == 0
        rle = {"size": a["segmentation"]["size"], "counts": a["segmentation"]["counts"].encode()}
        assert np.array_equal(mask_utils.decode(rle).astype(bool), masks[i])
        assert a["area"] == masks[i].sum()
        assert a["score"] == pytest.approx(float(res.boxes.conf[i]))
    assert anns[0]["bbox"] == [20, 10, 50, 30]  # true width: x2 - x1
    assert anns[3]["bbox"] == [0, 0, 0, 0] and anns[3]["area"] == 0
    assert {a["category_id"] for a in res.to_coco(category_id=3)} == {3}


def test_records_exposed_and_in_coco() -> None:
    masks = synthetic_masks()[:2]
    records = [
        {"predicted_iou": np.float32(0.91), "stability_score": 0.97, "point_coords": [[30.0, 20.0]],
         "crop_box": [0.0, 0.0, float(W), float(H)], "area": int(masks[i].sum())}
        for i in range(2)
    ]
    r = Results(synthetic_image(), "x.png", masks, scores=[0.91, 0.5], records=records)
    assert r.records is not None and len(r.records) == 2 and len(r[1].records) == 1
    ann = r.to_coco()[0]
    assert ann["predicted_iou"] == pytest.approx(0.91) and ann["stability_score"] == 0.97
    assert ann["point_coords"] == [[30.0, 20.0]]
    assert ann["crop_box"] == [0, 0, W, H] and all(type(v) is int for v in ann["crop_box"])
    json.dumps(r.to_coco())
    with pytest.raises(ValueError):
        Results(synthetic_image(), "x.png", masks, records=records[:1])


def test_save_txt_polygons_rasterise_back(res: Results, tmp_path) -> None:
    path = tmp_path / "labels" / "synthetic.txt"
    assert res.save_txt(path) == str(path)
    lines = path.read_text().splitlines()
    assert len(lines) == 4  # the empty mask is skipped
    masks = synthetic_masks()
    for line, i in zip(lines, (0, 1, 2, 4)):
        fields = line.split()
        assert int(fields[0]) == i
        assert all(len(v.split(".")[1]) == 6 for v in fields[1:])
        xy = np.array(fields[1:], float).reshape(-1, 2)
        assert len(xy) >= 3 and xy.min() >= 0 and xy.max() <= 1
        assert iou(rasterise(xy * [W, H]), masks[i]) >= 0.9
    res.save_txt(path, save_conf=True)  # rewrites, does not append
    lines = path.read_text().splitlines()
    assert len(lines) == 4 and float(lines[0].split()[-1]) == pytest.approx(0.9)
    assert sorted(os.listdir(path.parent)) == ["synthetic.txt"]  # no temp files left


def test_summary_and_json(res: Results) -> None:
    s = res.summary()
    assert len(s) == 5 and s[0]["name"] == "0" and s[0]["class"] == 0
    assert s[0]["confidence"] == pytest.approx(0.9)
    assert s[0]["box"] == {"x1": 20.0, "y1": 10.0, "x2": 70.0, "y2": 40.0}
    assert len(s[0]["segments"]["x"]) == len(res.masks.xy[0])
    assert s[3]["segments"] == {"x": [], "y": []}
    sn = res.summary(normalize=True, decimals=3)
    assert sn[4]["box"]["x2"] == 1.0 and max(sn[1]["segments"]["x"]) <= 1
    parsed = json.loads(res.to_json())
    assert parsed == json.loads(json.dumps(s))
    json.loads(res.to_json(normalize=True))


def test_plot_and_save(res: Results, tmp_path) -> None:
    img = res.orig_img.copy()
    out = res.plot()
    assert out.shape == (H, W, 3) and out.dtype == np.uint8
    assert np.array_equal(res.orig_img, img)  # the original is untouched
    masks = synthetic_masks()
    for i in (0, 1, 2, 4):
        assert (out[masks[i]] != img[masks[i]]).any(axis=1).mean() > 0.9
    bare = res.plot(masks=False, boxes=False)
    assert np.array_equal(bare, img)
    plain = res.plot(labels=False, conf=False, line_width=1)
    assert plain.shape == (H, W, 3)
    target = tmp_path / "out" / "plot.png"
    assert res.save(target) == str(target)
    back = cv2.imread(str(target))
    assert back is not None and np.array_equal(back, out)
    assert sorted(os.listdir(target.parent)) == ["plot.png"]
    with pytest.raises(ValueError):
        res.save(tmp_path / "plot.notanimageformat")
    assert sorted(os.listdir(tmp_path)) == ["out"]  # no temp files from the failed save
    # a folder: save() writes its default name inside it, save_txt() says it needs a file name
    assert Path(res.save(tmp_path / "out")).parent == tmp_path / "out"
    with pytest.raises(IsADirectoryError, match="is a folder: give a file name"):
        res.save_txt(tmp_path / "out")
    assert not [f for f in os.listdir(tmp_path / "out") if f.endswith(".tmp")]


def test_plot_takes_ultralytics_arguments(res: Results, tmp_path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    grey = np.full((H, W, 3), 128, np.uint8)
    on_grey = res.plot(img=grey, boxes=False)
    outside = cv2.dilate(synthetic_masks().any(0).astype(np.uint8), np.ones((7, 7), np.uint8)) == 0  # past outlines
    assert (on_grey[outside] == 128).all() and not np.array_equal(on_grey, res.plot(boxes=False))
    big, small = res.plot(font_size=40), res.plot(font_size=8)
    assert (big != res.orig_img).sum() > (small != res.orig_img).sum()  # larger label boxes
    out = res.plot(save=True)
    assert np.array_equal(cv2.imread("results_synthetic.jpg").shape, out.shape)
    res.plot(filename="p.png")
    assert np.array_equal(cv2.imread("p.png"), res.plot())
    with pytest.raises(ValueError, match="original size"):
        res.plot(img=grey[:10])


def test_thin_masks_get_valid_yolo_polygons(tmp_path) -> None:
    m = np.zeros((4, H, W), bool)
    m[0, 10, 5:55] = True  # a horizontal 1-pixel line: 2 contour vertices
    m[1, 20:70, 100] = True  # a vertical one
    np.fill_diagonal(m[2, 30:60, 30:60], True)  # a diagonal one
    m[3, 90, 90] = True  # a single pixel: 1 vertex
    r = Results(synthetic_image(), "thin.png", torch.from_numpy(m))
    assert [len(p) for p in r.masks.xy] == [2, 2, 2, 1]
    lines = Path(r.save_txt(tmp_path / "thin.txt")).read_text().splitlines()
    assert [int(line.split()[0]) for line in lines] == [0, 1, 2, 3]  # none dropped
    for line, mask in zip(lines, m):
        xy = np.array(line.split()[1:], float).reshape(-1, 2)
        assert len(xy) == 3
        assert np.array_equal(rasterise(xy * [W, H]), mask)  # closed back on itself: the same pixels


def test_save_names_for_video_frames_urls_and_folders(tmp_path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    m = torch.from_numpy(synthetic_masks()[:1])
    for path, name in [("clip.mp4:frame_3", "results_clip_frame_3.jpg"),
                       ("https://example.com/bus.jpg?size=l", "results_bus.jpg"),
                       ("https://example.com/", "results_example.jpg"),
                       ("scan.tiff", "results_scan.tiff")]:
        assert Results(synthetic_image(), path, m).save() == name and (tmp_path / name).is_file()
    r = Results(synthetic_image(), "a.png", m)
    assert Path(r.save("new/")) == Path("new/results_a.png") and (tmp_path / "new" / "results_a.png").is_file()


def test_run_file_names_of_frames_urls_and_odd_names() -> None:
    from segany.engine.saving import image_file_name

    assert image_file_name("clip.mp4:frame_3") == ("clip_frame_3", ".jpg")
    assert image_file_name("x:frame_1.png") == ("x_frame_1", ".png")  # a file of that name, not a frame
    assert image_file_name("http://h/a/%C3%BC.png?x=1&y=2") == ("ü", ".png")  # decoded, no query
    assert image_file_name("http://h/b%20b.jpg#top") == ("b_b", ".jpg")
    assert image_file_name("http://example.com/") == ("example", ".jpg")  # the host, when no file name
    from segany.engine.saving import source_name

    assert source_name("http://h/a.jpg?x=1&y=2") == "a.jpg"  # as the verbose line shows it


def test_run_json_names_a_url_image_as_its_saved_file(tmp_path) -> None:
    import json

    from segany.engine.saving import RunWriter

    writer = RunWriter(project=str(tmp_path), name="p")
    writer.write(Results(synthetic_image(), "https://example.com/a/%C3%BC.png?x=1&y=2",
                         torch.from_numpy(synthetic_masks()[:1])))
    assert sorted(f.name for f in writer.folder.iterdir()) == ["ü.json", "ü.png"]
    image = json.loads((writer.folder / "ü.json").read_text())["image"]
    assert image["file_name"] == "ü.png" and image["path"] == "https://example.com/a/%C3%BC.png?x=1&y=2"


def test_colours_stay_distinct_past_the_palette() -> None:
    from segany.engine.plotting import PALETTE_BGR, color

    assert [color(i) for i in range(len(PALETTE_BGR))] == list(PALETTE_BGR)
    colours = [color(i) for i in range(500)]
    assert len(set(colours)) == 500 and all(0 <= v <= 255 for c in colours for v in c)


def test_empty_results(tmp_path) -> None:
    for masks in (None, np.zeros((0, H, W), bool), torch.zeros((0, H, W), dtype=torch.bool)):
        r = Results(synthetic_image(), "empty.jpg", masks)
        assert len(r) == 0 and r.masks is not None
        assert r.masks.data.shape == (0, H, W) and r.masks.data.dtype == torch.bool
        assert r.boxes.data.shape == (0, 6) and r.boxes.xyxy.shape == (0, 4) and r.boxes.xywhn.shape == (0, 4)
        assert r.masks.xy == [] and r.masks.xyn == []
        assert r.summary() == [] and json.loads(r.to_json()) == [] and r.to_coco() == []
        assert r.verbose() == "0 masks"
        assert np.array_equal(r.plot(), r.orig_img)
        txt = tmp_path / "empty.txt"
        r.save_txt(txt)
        assert txt.read_text() == ""
        assert len(r.numpy()) == 0 and len(r.cpu()[0:0]) == 0


def test_input_variants_and_validation() -> None:
    img = synthetic_image()
    m = synthetic_masks()
    r = Results(img, "a.jpg", m[0])  # a single (H, W) mask
    assert r.masks.data.shape == (1, H, W)
    logits = np.where(m[:2], 5.0, -5.0).astype(np.float32)
    r = Results(img, "a.jpg", logits, cls=[3, 3], names={3: "car"})
    assert r.masks.data.dtype == torch.bool and torch.equal(r.masks.data, torch.from_numpy(m[:2]))
    assert r.boxes.conf.tolist() == [1.0, 1.0]  # no scores given
    assert r.summary()[0]["name"] == "car" and r.to_coco()[1]["category_id"] == 3
    with pytest.raises(ValueError, match="match the image"):
        Results(img, "a.jpg", np.zeros((1, H + 1, W), bool))
    with pytest.raises(ValueError, match="scores"):
        Results(img, "a.jpg", m, scores=[0.5])
    with pytest.raises(ValueError, match="low_res_logits"):
        Results(img, "a.jpg", m, low_res_logits=torch.zeros(2, 256, 256))
    assert len(Masks(m, (H, W))) == 5 and Boxes(np.zeros(6, np.float32), (H, W)).shape == (1, 6)


def test_save_txt_to_a_folder_name_ending_in_a_slash_is_an_error(res: Results, tmp_path) -> None:
    # "labels/" names a folder even before it exists: no file called "labels" may appear.
    with pytest.raises(IsADirectoryError, match="is a folder: give a file name"):
        res.save_txt(f"{tmp_path}/labels/")
    assert os.listdir(tmp_path) == []


def test_new_is_an_empty_result_of_the_same_image(res: Results) -> None:
    empty = res.new()  # Ultralytics' Results.new()
    assert isinstance(empty, Results) and len(empty) == 0 and empty.masks.data.shape == (0, H, W)
    assert empty.boxes.data.shape == (0, 6) and empty.low_res_logits is None and empty.records is None
    assert empty.orig_img is res.orig_img and empty.path == res.path and empty.orig_shape == res.orig_shape
    assert empty.names == res.names and empty.speed == res.speed
    empty.names[0], empty.speed["inference"] = "changed", 0.0
    assert res.names[0] == "0" and res.speed["inference"] == 2.0  # copies, not shared


def test_polygons_are_merged_once_and_returned_as_copies(res: Results, monkeypatch) -> None:
    from segany.engine import containers

    calls = []
    real = containers.merge_contours
    monkeypatch.setattr(containers, "merge_contours", lambda c: calls.append(1) or real(c))
    first = [p.copy() for p in res.masks.xy]
    for i in range(len(res)):  # indexing xy in a loop must not re-merge every mask each time
        res.masks.xy[i]
    res.masks.xyn, res.summary(), res.to_json()
    assert len(calls) == len(res)
    res.masks.xy[0][:] = -1  # editing a returned polygon leaves the cached one alone
    res.masks.contours(0)[0][:] = -1
    assert all(np.array_equal(a, b) for a, b in zip(res.masks.xy, first))
    assert res.masks.contours(0)[0].min() >= 0


def test_masks_and_image_are_checked(res: Results) -> None:
    with pytest.raises(ValueError, match=r"orig_shape"):
        Masks(synthetic_masks(), (H // 2, W // 2))  # polygons would be normalised by the wrong size
    with pytest.raises(ValueError, match="uint8"):
        Results(synthetic_image().astype(np.float32) / 255, "a.jpg", synthetic_masks())
    with pytest.raises(ValueError, match=r"\(H, W, 3\)"):
        Results(np.zeros((H, W, 5), np.uint8), "a.jpg", synthetic_masks())


def test_boxes_is_track_and_names_as_a_list() -> None:
    assert Boxes(np.zeros((2, 6), np.float32), (H, W)).is_track is False
    assert Boxes(np.zeros((2, 7), np.float32), (H, W)).is_track is True
    r = Results(synthetic_image(), "a.jpg", synthetic_masks()[:2], names=["car", "bus"])
    assert r.names == {0: "car", 1: "bus"} and r.summary()[1]["name"] == "bus"


def test_plot_on_an_image_that_is_not_8_bit_bgr_is_an_error(res: Results) -> None:
    with pytest.raises(ValueError, match="uint8"):
        res.plot(img=np.ones((H, W, 3), np.float32))  # would be drawn on a black image
    with pytest.raises(ValueError, match="uint8"):
        res.plot(img=np.full((H, W, 3), 300, np.uint16))  # would wrap around
    with pytest.raises(ValueError, match=r"\(H, W, 3\)"):
        res.plot(img=np.zeros((H, W, 5), np.uint8))
    assert res.plot(img=np.zeros((H, W), np.uint8)).shape == (H, W, 3)  # grayscale is fine


def test_other_task_outputs_are_none_as_in_ultralytics(res: Results) -> None:
    # Code written for any Ultralytics Results checks these before using boxes and masks.
    assert res.probs is None and res.keypoints is None and res.obb is None
    assert res[0].obb is None and res.numpy().probs is None


@pytest.mark.parametrize("kwargs", [{"line_width": -1}, {"line_width": 0.4}, {"font_size": -3}])
def test_plot_rejects_widths_and_font_sizes_below_one_pixel(res: Results, kwargs) -> None:
    # line_width=-1 would be OpenCV's "filled": solid boxes over the image.
    with pytest.raises(ValueError, match=next(iter(kwargs))):
        res.plot(**kwargs)
    assert np.array_equal(res.plot(line_width=0, font_size=0), res.plot())  # 0: automatic, as in Ultralytics


def test_first_mask_label_is_drawn_on_top() -> None:
    from segany.engine.plotting import color

    m = np.zeros((3, H, W), bool)
    m[0, 40:80, 30:90], m[1, 40:100, 30:130], m[2, 40:110, 30:150] = True, True, True  # one top-left corner
    out = Results(synthetic_image(), "a.png", m).plot(masks=False, font_size=12, line_width=2)
    assert tuple(out[39, 30]) == color(0)  # the label box above the shared corner is mask 0's


def test_json_and_coco_stay_valid_json_with_a_non_finite_score_or_a_numpy_id():
    img = np.zeros((8, 10, 3), np.uint8)
    m = np.zeros((2, 8, 10), bool)
    m[:, 2:5, 3:7] = True
    r = Results(img, "a.png", m, scores=[float("nan"), float("inf")])
    assert [d["confidence"] for d in json.loads(r.to_json())] == [None, None]
    anns = r.to_coco(image_id=np.int64(3), category_id=np.int32(1))
    text = json.dumps(anns, allow_nan=False)  # NaN/Infinity are not JSON; np.int64 is not serialisable
    assert [a["score"] for a in json.loads(text)] == [None, None]
    assert [(a["image_id"], a["category_id"]) for a in anns] == [(3, 1), (3, 1)]


def test_coco_ids_that_are_not_numbers_stay_as_given(res: Results) -> None:
    # before numpy ids were converted, a string id (a file name, as some datasets use) went through;
    # int() must not refuse it, nor turn "0007" into 7
    anns = res.to_coco(image_id="bus_0007", category_id="person")
    assert {(a["image_id"], a["category_id"]) for a in anns} == {("bus_0007", "person")}
    assert json.loads(json.dumps(anns))[0]["image_id"] == "bus_0007"


def test_names_as_id_name_pairs_still_read_as_a_dict() -> None:
    # dict(names) took (id, name) pairs before lists of names were added; they must not become names
    pairs = [(0, "car"), (1, "bus")]
    for names in (pairs, tuple(pairs), sorted({1: "bus", 0: "car"}.items())):
        r = Results(synthetic_image(), "a.jpg", synthetic_masks()[:2], names=names)
        assert r.names == {0: "car", 1: "bus"} and r.summary()[1]["name"] == "bus"
    assert Results(synthetic_image(), "a.jpg", synthetic_masks()[:2], names=["ab", "cd"]).names == {0: "ab", 1: "cd"}
