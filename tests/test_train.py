"""Training and validation: the loss falls, checkpoints reload bit-identically (also into Meta's
``Sam``), resume equals an uninterrupted run, and the metric reads 1 for perfect and 0 for empty masks."""

from __future__ import annotations

import json

import pytest
import torch

from segany import SAM
from segany.cli import main
from segany.data import SyntheticDataset
from segany.errors import ConfigError
from segany.models import ModelConfig, build_model
from segany.models.registry import SAM_DECODER
from segany.train import OracleRunner, train, val
from segany.train.losses import sam_loss
from segany.train.prompts_sim import (center_point, corrective_point, corrective_points, mask_boxes,
                                     noisy_boxes, random_points)
from segany.train.validate import format_table

from conftest import meta_twin

# Smaller than conftest.SMALL_VIT, decoder included: a training step takes milliseconds.
TINY = ModelConfig("tiny", "sam_vit", dict(
    encoder=dict(img_size=128, patch_size=16, embed_dim=32, depth=2, num_heads=2, mlp_ratio=2.0, window_size=4,
                 global_attn_indexes=(1,)),
    **dict(SAM_DECODER, prompt_embed_dim=64, decoder_mlp_dim=128, iou_head_hidden_dim=64)))
DATA = SyntheticDataset(6, seed=0, size=128, max_objects=3)
FAST = dict(batch=2, lr=1e-3, verbose=False, trainable="all", exist_ok=True)


def tiny_model(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return build_model(TINY)


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest


def test_loss_prefers_the_best_candidate():
    target = torch.zeros(1, 16, 16)
    target[0, 4:12, 4:12] = 1
    good = (target * 20 - 10)[:, None]
    logits = torch.cat([-good, good, torch.zeros_like(good)], 1)  # wrong, right, undecided
    iou = torch.tensor([[0.0, 1.0, 0.0]])
    loss, best, parts = sam_loss(logits, iou, target)
    assert best.tolist() == [1]
    assert float(loss) < 0.01 and float(parts["miou"]) == 1.0


def test_simulated_prompts_stay_on_the_mask():
    g = torch.Generator().manual_seed(0)
    m = torch.zeros(2, 50, 60, dtype=torch.bool)
    m[0, 10:30, 20:50] = True
    m[1, 5:8, 2:4] = True
    assert mask_boxes(m).tolist() == [[20, 10, 49, 29], [2, 5, 3, 7]]
    for _ in range(10):
        boxes = noisy_boxes(m, g)
        assert (boxes[:, :2] <= boxes[:, 2:]).all() and (boxes >= 0).all() and (boxes[:, 0::2] <= 59).all()
        assert (boxes[:, 1::2] <= 49).all() and (boxes[0] - torch.tensor([20, 10, 49, 29])).abs().max() <= 20
        xy = random_points(m, g)
        assert m[torch.arange(2), xy[:, 1].long(), xy[:, 0].long()].all()
    cx, cy = center_point(m[0].numpy())  # a 20-pixel-high bar: any point of its middle row is most interior
    assert cy == pytest.approx(20, abs=1) and 29 <= cx <= 41
    pred = m.clone()
    pred[0, :, 35:] = False  # misses the right half: the click is positive, in the miss
    pred[1, 20:30, 20:30] = True  # a false positive larger than any miss: a negative click in it
    for _ in range(5):
        xy, labels = corrective_points(pred, m, g)
        x, y = xy[:, 0].long(), xy[:, 1].long()
        assert labels.tolist() == [1, 0]
        assert m[0, y[0], x[0]] and not pred[0, y[0], x[0]] and pred[1, y[1], x[1]] and not m[1, y[1], x[1]]
    xy, labels = corrective_points(m, m, g)  # nothing to fix: a positive click on the object
    assert labels.tolist() == [1, 1] and m[torch.arange(2), xy[:, 1].long(), xy[:, 0].long()].all()
    (x, y), label = corrective_point(pred[0].numpy(), m[0].numpy())
    assert label == 1 and m[0, int(y), int(x)] and not pred[0, int(y), int(x)]
    assert corrective_point(m[0].numpy(), m[0].numpy()) is None


def test_training_reduces_the_loss(tmp_path):
    out = train(tiny_model(), DATA, epochs=4, project=tmp_path, name="run", **FAST)
    losses = [h["loss"] for h in out["history"]]
    assert len(losses) == 4 and out["steps"] == 12
    assert losses[-1] < 0.8 * losses[0]


def test_checkpoint_reloads_bit_identically_and_in_meta(tmp_path):
    out = train(tiny_model(), DATA, epochs=1, project=tmp_path, name="run", click_rounds=0, **FAST)
    trained = out["model"].state_dict()
    sd = torch.load(out["last"], weights_only=True)
    assert set(sd) == set(trained) and all(isinstance(v, torch.Tensor) for v in sd.values())  # a plain state dict
    assert all(torch.equal(sd[k], trained[k]) for k in sd)
    model = SAM(out["last"])
    assert all(torch.equal(v, trained[k]) for k, v in model.model.state_dict().items())
    assert torch.load(out["best"], weights_only=True).keys() == sd.keys()
    # Meta's Sam of the same architecture takes the file as it is and gives the same masks.
    pytest.importorskip("segment_anything")
    ref = meta_twin(model.model, model.config)
    ref.load_state_dict(sd, strict=True)
    x = torch.randn(1, 3, 128, 128)
    box = torch.tensor([[10.0, 20.0, 90.0, 100.0]])
    with torch.no_grad():
        ours = model.model.decode(model.model.encode_image(x), boxes=box, multimask_output=True)
        emb = ref.image_encoder(x)
        sparse, dense = ref.prompt_encoder(points=None, boxes=box, masks=None)
        theirs = ref.mask_decoder(emb, ref.prompt_encoder.get_dense_pe(), sparse, dense, True)
    torch.testing.assert_close(ours[0], theirs[0], atol=1e-4, rtol=0)
    torch.testing.assert_close(ours[1], theirs[1], atol=1e-4, rtol=0)


def test_resume_continues_exactly(tmp_path):
    straight = train(tiny_model(), DATA, epochs=2, project=tmp_path, name="straight", **FAST)

    with pytest.raises(KeyboardInterrupt):
        train(tiny_model(), DATA, epochs=2, project=tmp_path, name="cut", on_epoch_end=stop_after_first_epoch,
              **FAST)
    state = torch.load(tmp_path / "cut" / "last_state.pt", weights_only=True)
    assert state["epoch"] == 1 and state["step"] == 3
    # epochs left out: the run's own 2, not the default 10
    resumed = train(tiny_model(seed=5), DATA, project=tmp_path, name="cut",
                    resume=str(tmp_path / "cut" / "last.pt"), **FAST)
    assert resumed["epochs"] == 2 and resumed["args"]["epochs"] == 2
    assert resumed["steps"] == 6 and [h["epoch"] for h in resumed["history"]] == [1, 2]
    a, b = straight["model"].state_dict(), resumed["model"].state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    # a setting other than the run's is refused (a default one takes the run's value)
    with pytest.raises(ConfigError, match=r"epochs=3 \(the run has 2\)"):
        train(tiny_model(), DATA, epochs=3, project=tmp_path, name="cut", resume=True, **FAST)
    with pytest.raises(ConfigError, match=r"lr=0.05 \(the run has"):
        train(tiny_model(), DATA, project=tmp_path, name="cut", resume=True, **{**FAST, "lr": 0.05})
    sd = torch.load(tmp_path / "cut" / "last.pt", weights_only=True)  # as if stopped between the two files
    next(iter(sd.values())).add_(1.0)
    torch.save(sd, tmp_path / "cut" / "last.pt")
    with pytest.raises(ConfigError, match="from different epochs"):
        train(tiny_model(), DATA, project=tmp_path, name="cut", resume=True, **FAST)
    with pytest.raises(ConfigError, match="holds no run to continue"):
        train(tiny_model(), DATA, epochs=3, project=tmp_path, name="never", resume=True, **FAST)


def stop_after_first_epoch(epoch, record):
    if epoch == 1:
        raise KeyboardInterrupt


@pytest.fixture(scope="module")
def disk_runs(tmp_path_factory):
    """A dataset on disk, a checkpoint, a 2-epoch run on them and copies of that run stopped after
    epoch 1 (started from a relative data path, so a resume elsewhere needs the recorded one)."""
    import os
    import shutil

    from segany.data import write_synthetic

    root = tmp_path_factory.mktemp("runs")
    write_synthetic(root / "d", n=6, seed=0, size=128, format="yolo")
    torch.save(tiny_model().state_dict(), root / "tiny.pt")
    cwd, threads = os.getcwd(), torch.get_num_threads()
    os.chdir(root)
    torch.set_num_threads(1)  # as the tests' one_thread (function-scoped, not on yet): bit-identical runs
    try:
        straight = train("tiny.pt", "d", epochs=2, project=root, name="straight", **FAST)
        with pytest.raises(KeyboardInterrupt):
            train("tiny.pt", "d", epochs=2, project=root, name="cut", on_epoch_end=stop_after_first_epoch, **FAST)
    finally:
        os.chdir(cwd)
        torch.set_num_threads(threads)
    for copy in ("cut_api", "cut_sam", "cut_cli"):
        shutil.copytree(root / "cut", root / copy)
    return root, straight["model"].state_dict()


def test_resume_takes_the_runs_model_and_data(disk_runs, tmp_path, monkeypatch):
    root, straight = disk_runs
    state = torch.load(root / "cut" / "last_state.pt", weights_only=True)
    assert state["args"]["data"] == str(root / "d") and state["args"]["model"] == str(root / "tiny.pt")
    monkeypatch.chdir(tmp_path)  # elsewhere: "d" and "tiny.pt" as typed are not here
    resumed = train(resume=root / "cut_api", verbose=False)  # no model, no data, no settings
    assert resumed["steps"] == 6 and resumed["args"]["data"] == str(root / "d")
    assert resumed["args"]["model"] == str(root / "tiny.pt")  # the run's, not the last.pt it was rebuilt from
    b = resumed["model"].state_dict()
    assert all(torch.equal(straight[k], b[k]) for k in straight)  # as if never stopped
    # SAM(...).train(resume=...) takes no data either, and trains that model in place
    model = SAM(str(root / "tiny.pt"))
    out = model.train(resume=str(root / "cut_sam" / "last.pt"), verbose=False)
    assert out["model"] is model.model and out["steps"] == 6
    assert all(torch.equal(straight[k], v) for k, v in model.model.state_dict().items())


def test_cli_resume_alone(disk_runs, tmp_path, monkeypatch, capsys):
    root, straight = disk_runs
    monkeypatch.chdir(tmp_path)
    assert main(["train", f"resume={root / 'cut_cli'}", "verbose=false"]) == 0
    assert f"checkpoints: {root / 'cut_cli' / 'last.pt'} (last)" in capsys.readouterr().out
    sd = torch.load(root / "cut_cli" / "last.pt", weights_only=True)
    assert all(torch.equal(straight[k], sd[k]) for k in straight)
    assert main(["train", f"resume={tmp_path / 'nowhere'}"]) == 2
    assert "holds no run to continue" in capsys.readouterr().err
    assert main(["train", "data=synthetic:2"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "train needs model=" in err and "resume=" in err


def test_resume_refuses_another_model_or_data(disk_runs, tmp_path):
    from segany.data import write_synthetic

    root, _ = disk_runs
    other = write_synthetic(tmp_path / "other", n=2, seed=1, size=128, format="yolo")
    # as epochs=3 is refused: a value other than the run's, named with the run's
    with pytest.raises(ConfigError, match=rf"data='{other}' \(the run has '{root / 'd'}'\); leave them out"):
        train(data=str(other), resume=root / "straight", verbose=False)
    with pytest.raises(ConfigError, match=r"model='sam_b' \(the run has .*tiny.pt'\)"):
        train("sam_b", resume=root / "straight", verbose=False)
    # the run's own names, or its last.pt as the model, are the run's: the finished run has nothing left to do
    for model in (str(root / "tiny.pt"), str(root / "straight" / "last.pt")):
        out = train(model, str(root / "d"), resume=root / "straight", verbose=False)
        assert out["steps"] == 6 and out["args"]["model"] == str(root / "tiny.pt")


def test_resume_of_a_run_on_a_python_dataset_asks_for_data(tmp_path, capsys):
    train(tiny_model(), DATA, epochs=1, project=tmp_path, name="mem", **FAST)
    with pytest.raises(ConfigError, match="does not record the dataset it was trained on .*; pass data="):
        train(resume=tmp_path / "mem", verbose=False)
    assert main(["train", f"resume={tmp_path / 'mem'}"]) == 2
    assert "pass data=" in capsys.readouterr().err
    out = train(tiny_model(), DATA, resume=tmp_path / "mem", verbose=False)  # given: as before
    assert out["steps"] == 3


@pytest.mark.parametrize("bad,match", [(dict(epochs=0), "epochs=0: expected a whole number >= 1"),
                                       (dict(batch=0), "batch=0"), (dict(lr=-1.0), "lr=-1.0: expected a positive"),
                                       (dict(warmup=-1.0), r"warmup=-1.0: expected a number in \[0.0, 1.0\]"),
                                       (dict(box_prob=7), "box_prob=7"),
                                       (dict(val_max_images=0), "val_max_images=0: expected a whole number >= 1"),
                                       (dict(seed=-1), "seed=-1: expected a whole number >= 0"),
                                       (dict(seed=1.5), "seed=1.5"), (dict(threads=-2), "threads=-2"),
                                       (dict(workers=-1), "workers=-1: expected a whole number >= 0"),
                                       (dict(val_data="synthetic:abc"), "synthetic:N:SEED")])
def test_bad_training_settings_fail_before_anything_is_written(tmp_path, bad, match):
    with pytest.raises(ConfigError, match=match):
        train(tiny_model(), DATA, project=tmp_path, name="bad", **{**FAST, **bad})
    assert not (tmp_path / "bad").exists()


def test_missing_val_data_fails_before_anything_is_written(tmp_path):
    with pytest.raises(FileNotFoundError, match="no segmentation dataset"):
        train(tiny_model(), DATA, project=tmp_path, name="bad", val_data=tmp_path / "nowhere", **FAST)
    assert not (tmp_path / "bad").exists()


@pytest.mark.parametrize("bad,match", [(dict(kinds=("foo",)), "kinds=foo: choose from"),
                                       (dict(n_points=0), "n_points=0"), (dict(max_images=-1), "max_images=-1"),
                                       (dict(max_images=0), "max_images=0")])
def test_val_settings_that_would_measure_nothing_are_refused(bad, match):
    with pytest.raises(ConfigError, match=match):
        val(data=SyntheticDataset(2, seed=4, size=96), runner=OracleRunner("perfect"), verbose=False, **bad)


def test_val_oracle_perfect_and_empty(tmp_path):
    data = SyntheticDataset(3, seed=4, size=96)
    perfect = val(data=data, runner=OracleRunner("perfect"), verbose=False)
    empty = val(data=data, runner=OracleRunner("empty"), verbose=False, save_json=tmp_path / "v.json")
    for key in ("box", "point_best3", "point_auto", "point_single", "points_3"):
        assert perfect[key] == pytest.approx(1.0)
        assert empty[key] == pytest.approx(0.0)
    assert perfect["instances"] == sum(len(s.masks) for s in data)
    assert json.loads((tmp_path / "v.json").read_text())["box"] == 0.0


def test_val_of_a_model(tmp_path, capsys):
    res = val(tiny_model(), SyntheticDataset(2, seed=4, size=96), max_instances=2)
    assert 0.0 <= res["box"] <= 1.0 and res["instances"] <= 4
    assert "point_best3" in capsys.readouterr().out


def test_sam_train_and_val_methods(tmp_path):
    path = tmp_path / "tiny.pt"
    torch.save(tiny_model().state_dict(), path)
    model = SAM(str(path))
    before = {k: v.clone() for k, v in model.model.state_dict().items()}
    out = model.train(data=DATA, epochs=1, project=tmp_path, name="m", trainable="decoder", batch=2, verbose=False)
    after = model.model.state_dict()
    changed = {k.split(".")[0] for k in after if not torch.equal(before[k], after[k])}
    assert changed == {"mask_decoder"}  # trainable="decoder" froze the rest
    assert model.val(data=SyntheticDataset(1, seed=3, size=96), verbose=False)["images"] == 1
    assert (tmp_path / "m" / "last.pt").is_file() and out["epochs"] == 1


def test_cli_train_and_val(tmp_path, capsys):
    from segany.data import write_synthetic

    data = write_synthetic(tmp_path / "d", n=2, seed=0, size=96, format="yolo")
    path = tmp_path / "tiny.pt"
    torch.save(tiny_model().state_dict(), path)
    rc = main(["train", f"model={path}", f"data={data}", "epochs=1", "batch=2", f"project={tmp_path}",
               "name=cli", "verbose=false"])
    assert rc == 0 and (tmp_path / "cli" / "last.pt").is_file()
    rc = main(["val", f"model={tmp_path / 'cli' / 'last.pt'}", f"data={data}", f"save_json={tmp_path / 'v.json'}",
               "kinds=box,point"])
    assert rc == 0 and "box" in json.loads((tmp_path / "v.json").read_text())
    assert main(["train", "epochs=1"]) == 2  # no data: usage error
    assert main(["train", "data=synthetic:2"]) == 2  # no model: usage error (no silent random ViT-B)
    assert main(["train", "model=sam_b", "data=synthetic:2", "epochs=0"]) == 2
    assert main(["val", "model=sam_b", "data=synthetic:abc"]) == 2
    assert "trainable" in (main(["train", "--help"]) or capsys.readouterr().out)


def test_images_without_instances_are_skipped_and_counted(tmp_path, capsys):
    import numpy as np

    from segany.data import ListDataset, Sample
    from segany.errors import SkippedImageWarning

    real = [s for s in SyntheticDataset(6, seed=0, size=(80, 120), max_objects=2) if len(s.masks)][:3]
    # Not square, so the input frame is resized: the padding of no masks used to miss the size.
    bare = Sample(np.zeros((80, 120, 3), np.uint8), np.zeros((0, 80, 120), bool), np.zeros(0, np.int64))
    data = ListDataset([bare, *real, bare])
    with pytest.warns(SkippedImageWarning, match="2 of 5 training images have no usable instance masks") as got:
        out = train(tiny_model(), data, epochs=2, project=tmp_path, name="run", val_data=data, **FAST)
    assert len([w for w in got if issubclass(w.category, SkippedImageWarning)]) == 1  # said once, not per epoch
    assert [h["images_without_instances"] for h in out["history"]] == [2, 2]
    assert out["history"][0]["val_images_without_instances"] == 2
    res = val(data=data, runner=OracleRunner("perfect"))
    assert res["images_without_instances"] == 2 and res["box"] == pytest.approx(1.0)
    assert "5 images, " in capsys.readouterr().out and "(2 images without instances, skipped)" in format_table(res)


def test_mobile_sam_at_another_size_is_refused(tmp_path):
    with pytest.raises(ConfigError, match="MobileSAM trains at imgsz=1024 only, not 512"):
        train("mobile_sam", DATA, imgsz=512, project=tmp_path, name="m", **FAST)
    assert not (tmp_path / "m").exists()
