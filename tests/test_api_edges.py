"""Rough edges of the Python API found in review: embeddings of another model, unsafe embedding
writes, inference-mode tensors handed out, options that passed the check and were ignored, a
failure while saving, results that could not be pickled, prompt values that converted silently."""

from __future__ import annotations

import os
import pickle

import cv2
import numpy as np
import pytest
import torch

from conftest import SMALL_VIT, random_sam, test_image
from segany import SAM, Predictor
from segany.errors import ConfigError, PromptError, SegAnyError

H, W = 180, 240
BOX = [40, 40, 120, 110]


def test_an_embedding_of_other_encoder_weights_is_refused(img_path, tmp_path):
    """Same architecture, same shapes, other weights (a fine-tuned or another size of SAM at the
    same input size): the masks would be wrong, so the file is refused. Other decoder weights
    with the same encoder take it."""
    a = Predictor(model=random_sam(SMALL_VIT, seed=0), config=SMALL_VIT)
    a.set_image(img_path)
    a.save_embedding(tmp_path / "a.emb")
    expected = a(bboxes=BOX)[0]
    other = Predictor(model=random_sam(SMALL_VIT, seed=1), config=SMALL_VIT)
    with pytest.raises(SegAnyError, match="another model's image encoder.*set_image"):
        other.load_embedding(tmp_path / "a.emb")
    assert other.image is None
    same_encoder = random_sam(SMALL_VIT, seed=1)
    same_encoder.image_encoder.load_state_dict(a.model.image_encoder.state_dict())
    b = Predictor(model=same_encoder, config=SMALL_VIT)
    b.load_embedding(tmp_path / "a.emb")
    assert b(bboxes=BOX)[0].masks.data.shape == expected.masks.data.shape
    # The same weights in another precision keep the fingerprint (bf16-rounded values).
    c = Predictor(model=random_sam(SMALL_VIT, seed=0).to(torch.bfloat16).float(), config=SMALL_VIT)
    c.load_embedding(tmp_path / "a.emb")
    assert c.image.path == img_path


def test_a_sam_embedding_is_refused_by_a_sam2_model_and_back(img_path, tmp_path):
    from segany.checkpoints import config_with
    from segany.models import MODELS, build_model

    from conftest import randomize

    cfg2 = config_with(MODELS["sam2.1_t"], img_size=256, embed_dim=32, num_heads=1, stages=(1, 1, 2, 1),
                       global_att_blocks=(3,))
    sam2 = Predictor(model=randomize(build_model(cfg2), 7), config=cfg2)
    sam2.set_image(img_path)
    sam2.save_embedding(tmp_path / "sam2.emb")
    sam = Predictor(model=random_sam(SMALL_VIT), config=SMALL_VIT)
    sam.set_image(img_path)
    sam.save_embedding(tmp_path / "sam.emb")
    # Forge the files of the other family at the same shapes: only the kind of features differs.
    data = torch.load(tmp_path / "sam.emb", weights_only=True)
    want = sam2.get_image_embedding()["image_embed"].shape
    data["features"] = torch.zeros(want)
    del data["encoder"]  # as a file of an older segany
    torch.save(data, tmp_path / "forged.emb")
    with pytest.raises(SegAnyError, match="another model .*a SAM embedding"):
        sam2.load_embedding(tmp_path / "forged.emb")
    with pytest.raises(SegAnyError, match="another model .*SAM 2 feature levels"):
        sam.load_embedding(tmp_path / "sam2.emb")


def test_save_embedding_is_atomic_and_makes_folders(model, img_path, tmp_path):
    model(img_path, bboxes=BOX)
    pred = model.predictor
    path = pred_path = tmp_path / "new" / "folder" / "x.emb"
    pred.save_embedding(pred_path)
    assert path.is_file()
    (tmp_path / "dir").mkdir()
    with pytest.raises(IsADirectoryError, match="is a folder.*image.emb"):
        pred.save_embedding(tmp_path / "dir")
    assert sorted(os.listdir(tmp_path)) == ["dir", "new", "scene.png"]  # no temporary file left
    junk = tmp_path / "junk.emb"
    junk.write_bytes(b"\x00" * 100)
    with pytest.raises(SegAnyError, match="not an embedding saved by") as info:
        pred.load_embedding(junk)
    assert "weights_only=False" not in str(info.value)  # torch's advice would be unsafe here
    cv2.imwrite(str(tmp_path / "photo.jpg"), np.zeros((8, 8, 3), np.uint8))  # a file of another kind
    with pytest.raises(SegAnyError, match=r"not an embedding saved by .*\); make one with set_image") as info:
        pred.load_embedding(tmp_path / "photo.jpg")
    assert "PyTorch 2.6" not in str(info.value) and len(str(info.value)) < 300  # no torch advice pasted in


def test_the_embedding_handed_out_takes_autograd_and_in_place_updates(model, img_path):
    model(img_path, bboxes=BOX)
    emb = model.predictor.get_image_embedding()
    head = torch.nn.Conv2d(emb.shape[1], 1, 1)
    head(emb).mean().backward()
    assert head.weight.grad is not None
    emb.add_(1)  # a copy: the predictor's embedding is unchanged
    assert not torch.equal(emb, model.predictor.get_image_embedding())


def test_options_that_were_ignored(small_ckpt, img_path):
    # A default source in the overrides, as Ultralytics' args.source.
    pred = Predictor(overrides=dict(model=small_ckpt, source=img_path))
    assert pred(bboxes=BOX)[0].path == img_path
    model = SAM(small_ckpt)
    with pytest.raises(ConfigError, match="model='sam_b.pt': this predictor holds .*SAM\\('sam_b.pt'\\)"):
        model(img_path, bboxes=BOX, model="sam_b.pt")
    assert len(model(img_path, bboxes=BOX, model=small_ckpt)[0]) == 1  # the model it holds: fine (Ultralytics style)
    assert len(SAM()(img_path, bboxes=BOX, model="segany_tiny.pt")[0]) == 1  # by name, held as a resolved path
    # Segment-everything values are checked when prompts make them unused, too.
    with pytest.raises(ConfigError, match="points_stride"):
        model(img_path, bboxes=BOX, points_stride="x")
    with pytest.raises(ConfigError, match="crop_n_layers"):
        model(img_path, bboxes=BOX, crop_n_layers=-1)
    with pytest.raises(ConfigError, match="point_grids and points_stride"):
        model(img_path, point_grids=[[[0.5, 0.5]]], points_per_side=4)
    grids = Predictor(overrides=dict(model=small_ckpt, point_grids=[[[0.5, 0.5]]]))
    with pytest.raises(ConfigError, match="point_grids and points_stride"):
        grids(img_path, points_stride=4)  # grids in the overrides, a stride in the call
    with pytest.raises(ConfigError, match="point_grids and points_stride"):
        Predictor(overrides=dict(model=small_ckpt, point_grids=[[[0.5, 0.5]]], points_stride=4))
    # Meta's own form: points_per_side=None beside the grids.
    meta_form = model(img_path, point_grids=[[[0.5, 0.5]]], points_per_side=None, conf_thres=0,
                      stability_score_thresh=0)[0]
    assert len(meta_form) >= 1 and [r["point_coords"] for r in meta_form.records] == [[[120.0, 90.0]]] * len(meta_form)
    assert len(Predictor(overrides=dict(model=small_ckpt, points_per_side=None, point_grids=[[[0.5, 0.5]]]))(
        img_path, conf_thres=0, stability_score_thresh=0)[0]) == len(meta_form)


def test_a_failure_while_saving_leaves_the_current_image(model, img_path, tmp_path):
    model(img_path, bboxes=BOX)
    current = model.predictor.image
    other = tmp_path / "other.png"
    cv2.imwrite(str(other), test_image(H, W, seed=3))
    (tmp_path / "run" / "other.json").mkdir(parents=True)  # something blocks the JSON file
    with pytest.raises(OSError):
        model(str(other), bboxes=BOX, save=True, project=str(tmp_path), name="run", exist_ok=True)
    assert model.predictor.image is current


def test_results_of_a_prompt_on_the_set_image_pickle_with_their_logits(model, img_path):
    model(img_path, bboxes=BOX)
    r = model(points=[100, 80])[0]  # logits made when first read
    back = pickle.loads(pickle.dumps(r))
    assert torch.equal(back.low_res_logits, r.low_res_logits)
    assert torch.equal(back.masks.data, r.masks.data)


@pytest.mark.parametrize("prompts, match", [
    (dict(points=["10", "20"]), "points must be numbers, got text"),
    (dict(points=[True, False]), "points must be numbers, got True/False"),
    (dict(points=[[10, 20]], labels=["1"]), "labels must be numbers, got text"),
    (dict(bboxes=[]), "bboxes is empty"),
    (dict(points=[]), "points is empty"),
])
def test_prompt_values_that_converted_silently(model, img_path, prompts, match):
    with pytest.raises(PromptError, match=match):
        model(img_path, **prompts)


def test_true_false_labels_are_positive_negative(model, img_path):
    r1 = model(img_path, points=[[[50, 60], [100, 80]]], labels=[[True, False]])[0]
    r2 = model(img_path, points=[[[50, 60], [100, 80]]], labels=[[1, 0]])[0]
    assert torch.equal(r1.masks.data, r2.masks.data)


def test_plot_alpha_and_save_txt_folder_messages(model, img_path, tmp_path):
    r = model(img_path, bboxes=BOX)[0]
    with pytest.raises(ValueError, match="alpha=2"):
        r.plot(alpha=2)
    assert r.plot(alpha=1.0).shape == (H, W, 3)
    with pytest.raises(IsADirectoryError, match="scene.txt"):
        r.save_txt(tmp_path)


def test_point_grids_as_a_nested_list(model, img_path):
    grid = [[0.5, 0.5], [0.25, 0.25]]
    a = model(img_path, point_grids=grid)[0]
    b = model(img_path, point_grids=np.array(grid))[0]
    assert torch.equal(a.masks.data, b.masks.data)


def test_segment_everything_shows_a_bar_with_verbose(model, img_path, capsys):
    model(img_path, points_per_side=4, points_per_batch=4, verbose=True)  # 4 batches
    assert "segment everything" in capsys.readouterr().err
    model(img_path, points_per_side=4, points_per_batch=4)  # not verbose, and stderr is no terminal here
    model(img_path, points_per_side=4, points_per_batch=8, verbose=True)  # 2 batches: too short for a bar
    assert "segment everything" not in capsys.readouterr().err


def test_a_predictor_without_a_model_checks_its_options_when_one_is_set_up(small_ckpt, img_path):
    pred = Predictor(overrides=dict(imgsz=1024, conf=0.25))  # as Ultralytics: setup_model comes later
    with pytest.raises(ConfigError, match="no model loaded.*setup_model"):
        pred.set_image(img_path)
    with pytest.raises(ConfigError, match="imgsz=1024: this model works at imgsz=256"):
        pred.setup_model(small_ckpt)  # checked against the model at once, not at the first image
    assert pred.model is None  # and not kept
    pred = Predictor(overrides=dict(imgsz=256))
    pred.setup_model(small_ckpt)
    assert len(pred(img_path, bboxes=BOX)[0]) == 1


@pytest.mark.parametrize("device", ["xpu", "meta", "nonsense", "cuda:abc"])
def test_devices_segany_does_not_run_on_are_one_line_errors(device):
    from segany.engine.device import select_device

    with pytest.raises(ConfigError, match=f"device='{device}'"):
        select_device(device)


def test_cpu_and_cpu_0_are_one_device(model, img_path):
    from segany.engine.device import select_device

    assert select_device("cpu:0") == select_device("cpu") == torch.device("cpu")
    pred = Predictor(model=model.model, config=model.config, overrides=dict(device="cpu:0"))
    assert len(pred(img_path, bboxes=BOX, device="cpu")[0]) == 1  # not "this predictor runs on cpu:0"
