"""The embedded default model (issue 8): ships in the package, loads offline, segments shapes."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import segany
from segany import SAM
from segany.checkpoints import read_state_dict
from segany.data import SyntheticDataset
from segany.models import MODELS
from segany.train import val

from conftest import meta_sam

ASTRONAUT = Path(segany.__file__).parent / "assets" / "astronaut.jpg"


def _offline(monkeypatch):
    def refuse(*a, **k):
        raise AssertionError("the default model must not touch the network")

    monkeypatch.setattr("segany.hub.download_file", refuse)
    monkeypatch.setattr("urllib.request.urlopen", refuse)


def test_default_model_is_bundled_and_loads_offline(monkeypatch):
    _offline(monkeypatch)
    model = SAM()
    assert model.config.name == "segany_tiny"
    path = Path(model.ckpt_path)
    assert path.parent == Path(segany.__file__).parent / "assets" and path.stat().st_size <= 10 * 2**20
    info = model.info(verbose=False)
    assert "demo" in info["description"] and "not SAM quality" in info["description"]
    r = model(str(ASTRONAUT), bboxes=[150, 30, 350, 250])[0]
    assert r.masks.shape == (1, 512, 512) and 0 < int(r.masks.data.sum()) < 512 * 512


def test_meta_classes_load_the_default_model():
    sd = read_state_dict(Path(segany.__file__).parent / "assets" / "segany_tiny.pt")
    meta = meta_sam(MODELS["segany_tiny"])
    meta.load_state_dict(sd, strict=True)
    ours = SAM().model
    x = torch.randn(1, 3, 256, 256)
    with torch.inference_mode():
        assert torch.allclose(meta.image_encoder(x), ours.image_encoder(x), atol=1e-4)


def test_default_model_quality_on_new_synthetic_images():
    # Held out: training used seeds 0-2 and validation seeds 1000/1001. The bar for this
    # check is box >= 0.85; measured on these 20 images: box 0.875, point (best of 3) 0.884.
    res = val(SAM().model, SyntheticDataset(20, seed=2000, size=256), kinds=("box", "point"), verbose=False)
    assert res["box"] >= 0.85, res
    assert res["point_best3"] >= 0.75, res


def test_cli_predict_without_a_model(tmp_path):
    out = subprocess.run([sys.executable, "-m", "segany", "predict", f"source={ASTRONAUT}", "bboxes=[150,30,350,250]",
                          f"project={tmp_path}", "name=run"], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert (tmp_path / "run" / "astronaut.jpg").is_file()
    assert np.asarray((tmp_path / "run" / "astronaut.jpg").read_bytes()).size > 0


def test_bf16_masks_match_fp32_on_the_default_model(monkeypatch):
    # half=True (bf16 autocast) against fp32 on real-looking images: issue 10 asks IoU >= 0.98.
    # A CPU without bf16 units would ignore half=True; pretend it has them, so that bf16 (emulated
    # there) is what is measured on every machine.
    from segany.engine import device
    from segany.train.losses import mask_iou

    monkeypatch.setattr(device, "cpu_has_native_bf16", lambda: True)
    model = SAM()
    ds = SyntheticDataset(6, seed=2100, size=256)
    ious = []
    for i in range(len(ds)):
        s = ds[i]
        boxes = [[float(v) for v in b] for b in _boxes(s.masks)]
        fp32 = model(s.image, bboxes=boxes)[0].masks.data
        bf16 = model(s.image, bboxes=boxes, half=True)[0].masks.data
        ious += mask_iou(bf16, fp32).tolist()
    assert min(ious) >= 0.9 and float(np.mean(ious)) >= 0.98, ious


def test_half_is_ignored_with_a_warning_on_a_cpu_without_bf16(monkeypatch):
    from segany.engine import device

    monkeypatch.setattr(device, "cpu_has_native_bf16", lambda: False)
    device._warn_half_ignored.cache_clear()
    model = SAM()
    s = SyntheticDataset(1, seed=2101, size=256)[0]
    boxes = [[float(v) for v in b] for b in _boxes(s.masks)]
    fp32 = model(s.image, bboxes=boxes)[0]
    with pytest.warns(UserWarning, match="half=True is ignored on this CPU"):
        half = model(s.image, bboxes=boxes, half=True)[0]
    assert np.array_equal(half.masks.data, fp32.masks.data) and np.array_equal(half.boxes.conf, fp32.boxes.conf)


def _boxes(masks: np.ndarray) -> list[list[int]]:
    out = []
    for m in masks:
        ys, xs = np.nonzero(m)
        out.append([xs.min(), ys.min(), xs.max(), ys.max()])
    return out


def test_model_defaults_apply_below_what_the_caller_sets():
    """segany_tiny's own segment-everything filters replace the global defaults; the caller's win."""
    from segany import Predictor
    from segany.config import DEFAULTS
    from segany.models import MODELS

    own = MODELS["segany_tiny"].extra["defaults"]
    assert own["conf_thres"] != DEFAULTS["conf_thres"]
    api = SAM()
    p = Predictor(model=api.model, config=api.config)
    assert p._options({})["conf_thres"] == own["conf_thres"]
    assert p._options({"conf_thres": 0.9})["conf_thres"] == 0.9
    fixed = Predictor(overrides=dict(conf_thres=0.95), model=api.model, config=api.config)
    assert fixed._options({})["conf_thres"] == 0.95
