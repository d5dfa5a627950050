"""SAM.save() and SAM.export(format="onnx"): the ONNX files run in onnxruntime and give segany's
torch outputs; the decoder file has the inputs and outputs of Meta's ONNX decoder."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import SMALL_VIT, random_sam, test_image
from segany import SAM
from segany.checkpoints import config_with
from segany.cli import main
from segany.errors import ConfigError, MissingDependencyError, NotAvailableError
from segany.models import MODELS
from segany.onnx_export import DECODER_INPUTS, DECODER_OUTPUTS

ort = pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")

TOL = 1e-4


def session(path: Path):
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])


@pytest.fixture(scope="module")
def vit(tmp_path_factory):
    """A small random SAM loaded from a checkpoint, and its two ONNX files (exported once)."""
    folder = tmp_path_factory.mktemp("onnx")
    torch.save(random_sam(SMALL_VIT, seed=3).state_dict(), folder / "small.pth")
    sam = SAM(str(folder / "small.pth"), device="cpu")
    paths = sam.export(file=folder / "small")
    return sam, {part: session(p) for part, p in paths.items()}, paths


def decoder_feed(emb, coords, labels, mask_input=None, orig_size=(180, 240)) -> dict[str, np.ndarray]:
    """Meta's ONNX decoder inputs (as in its onnx_model_example notebook)."""
    has_mask = mask_input is not None
    if mask_input is None:
        mask_input = torch.zeros(1, 1, emb.shape[-2] * 4, emb.shape[-1] * 4)
    return dict(image_embeddings=emb.numpy(), point_coords=coords.numpy().astype(np.float32),
                point_labels=labels.numpy().astype(np.float32), mask_input=mask_input.numpy(),
                has_mask_input=np.array([float(has_mask)], np.float32),
                orig_im_size=np.array(orig_size, np.float32))


def torch_reference(model, emb, points, labels, box, mask_input, orig_size):
    """segany's decode + postprocess, all 4 mask tokens (single-mask output first, as in Meta's file)."""
    kw = dict(points=None if points is None else (points, labels), boxes=box, mask_inputs=mask_input)
    with torch.no_grad():
        low1, iou1 = model.decode(emb, multimask_output=False, **kw)
        low3, iou3 = model.decode(emb, multimask_output=True, **kw)
        low, iou = torch.cat([low1, low3], 1), torch.cat([iou1, iou3], 1)
        return model.postprocess_masks(low, model.input_size(*orig_size), orig_size), iou, low


def onnx_prompt(points, labels, box):
    """Points (and a box as two corner points labelled 2, 3), or a padding point when there is no box."""
    if box is not None:
        return torch.cat([points, box.view(1, 2, 2)], 1), torch.cat([labels, torch.tensor([[2.0, 3.0]])], 1)
    return torch.cat([points, torch.zeros(1, 1, 2)], 1), torch.cat([labels, -torch.ones(1, 1)], 1)


def test_files_and_layout(vit):
    sam, sessions, paths = vit
    assert set(paths) == {"encoder", "decoder"}
    assert [p.name for p in paths.values()] == ["small_encoder.onnx", "small_decoder.onnx"]
    assert not [f for f in paths["decoder"].parent.iterdir() if f.name.startswith(".")]  # no temporary left
    dec = sessions["decoder"]
    assert [i.name for i in dec.get_inputs()] == list(DECODER_INPUTS)
    assert [o.name for o in dec.get_outputs()] == list(DECODER_OUTPUTS)
    shapes = {i.name: i.shape for i in dec.get_inputs()}
    assert shapes["point_coords"][1] == shapes["point_labels"][1] == "num_points"  # dynamic
    enc = sessions["encoder"]
    assert [i.shape for i in enc.get_inputs()] == [[1, 3, 256, 256]]
    assert [o.shape for o in enc.get_outputs()] == [[1, 256, 16, 16]]


def test_encoder_matches_torch(vit):
    sam, sessions, _ = vit
    x = torch.randn(1, 3, 256, 256, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = sam.model.image_encoder(x).numpy()
    out = sessions["encoder"].run(None, {"image": x.numpy()})[0]
    assert np.abs(out - ref).max() <= TOL * np.abs(ref).max()


@pytest.mark.parametrize("n_points,with_box,with_mask,orig_size", [
    (1, False, False, (180, 240)), (3, False, True, (300, 200)), (1, True, False, (256, 256)),
    (6, True, True, (7, 1000)), (0, True, False, (1000, 3)), (12, False, False, (640, 480)),
])
def test_decoder_matches_torch(vit, n_points, with_box, with_mask, orig_size):
    sam, sessions, _ = vit
    model, g = sam.model, torch.Generator().manual_seed(n_points)
    emb = torch.randn(1, 256, 16, 16, generator=g)
    points = torch.rand(1, n_points, 2, generator=g) * torch.tensor(model.input_size(*orig_size)[::-1])
    labels = torch.randint(0, 2, (1, n_points), generator=g).float()
    box = torch.tensor([[20.0, 30.0, 150.0, 170.0]]) if with_box else None
    mask_input = torch.randn(1, 1, 64, 64, generator=g) * 5 if with_mask else None
    ref = torch_reference(model, emb, points if n_points else None, labels, box, mask_input, orig_size)
    out = sessions["decoder"].run(None, decoder_feed(emb, *onnx_prompt(points, labels, box), mask_input, orig_size))
    assert out[0].shape == (1, 4, *orig_size)
    for name, o, r in zip(DECODER_OUTPUTS, out, ref):
        assert o.shape == tuple(r.shape), name
        assert np.abs(o - r.numpy()).max() <= TOL, (name, np.abs(o - r.numpy()).max())


def test_meta_pipeline_gives_segany_results(vit):
    """Code written for Meta's ONNX files (its preprocessing and coordinate transform, then
    encoder and decoder) gives what ``SAM.__call__`` gives on the same image and prompt."""
    transforms = pytest.importorskip("segment_anything.utils.transforms")
    sam, sessions, _ = vit
    bgr = test_image(180, 240)
    rgb = bgr[..., ::-1]
    t = transforms.ResizeLongestSide(256)
    x = torch.as_tensor(t.apply_image(rgb)).permute(2, 0, 1).float()
    mean, std = torch.tensor([123.675, 116.28, 103.53]), torch.tensor([58.395, 57.12, 57.375])
    x = (x - mean[:, None, None]) / std[:, None, None]
    x = torch.nn.functional.pad(x, (0, 256 - x.shape[2], 0, 256 - x.shape[1]))[None]
    emb = torch.as_tensor(sessions["encoder"].run(None, {"image": x.numpy()})[0])
    pts, lbl = np.array([[170.0, 120.0], [60.0, 60.0]]), np.array([1.0, 0.0])
    coords = t.apply_coords(np.concatenate([pts, [[0.0, 0.0]]])[None], rgb.shape[:2])
    masks, iou, low = sessions["decoder"].run(None, decoder_feed(
        emb, torch.as_tensor(coords), torch.as_tensor(np.append(lbl, -1.0))[None]))

    r = sam(bgr, points=[pts.tolist()], labels=[lbl.tolist()], multimask_output=True)[0]
    order = np.argsort(-iou[0, 1:], kind="stable") + 1  # segany lists the 3 candidates best first
    assert np.abs(r.boxes.conf.numpy() - iou[0, order]).max() <= 1e-3
    assert np.abs(r.low_res_logits.numpy() - low[0, order]).max() <= 1e-3
    assert (r.masks.data.numpy() == (masks[0, order] > 0)).mean() >= 0.999


def test_return_single_mask_cli(vit, tmp_path, capsys):
    """`segany export` writes Meta's single-mask decoder: the multimask output with the best IoU
    for one point (+ padding), the single-mask output for more points."""
    sam, _, _ = vit
    target = tmp_path / "single.onnx"
    assert main(["export", f"model={sam.ckpt_path}", "parts=decoder", f"file={target}",
                 "return_single_mask=True", "device=cpu"]) == 0
    assert capsys.readouterr().out.strip() == f"decoder: {target}"
    dec = session(target)
    g = torch.Generator().manual_seed(5)
    emb = torch.randn(1, 256, 16, 16, generator=g)
    for n in (1, 3):
        points, labels = torch.rand(1, n, 2, generator=g) * 200, torch.ones(1, n)
        up, iou, low = torch_reference(sam.model, emb, points, labels, None, None, (180, 240))
        masks, iou_out, low_out = dec.run(None, decoder_feed(emb, *onnx_prompt(points, labels, None)))
        best = int(iou[0, 1:].argmax()) + 1 if n + 1 <= 2 else 0  # Meta counts the padding point too
        assert masks.shape == (1, 1, 180, 240) and iou_out.shape == (1, 1)
        assert abs(iou_out[0, 0] - iou[0, best].item()) <= TOL
        assert np.abs(low_out[0, 0] - low[0, best].numpy()).max() <= TOL
        assert np.abs(masks[0, 0] - up[0, best].numpy()).max() <= TOL


def test_encoder_with_large_global_blocks(tmp_path):
    """ViT-B/L/H's global blocks (64×64 tokens at 1024) take the CPU's attention-by-parts path when
    traced; a 48×48 grid takes it too, at a fraction of the cost."""
    from segany.models import vit
    from segany.onnx_export import export_onnx

    assert 48 * 48 >= vit.CPU_PARTS_ALWAYS_TOKENS
    cfg = config_with(MODELS["sam_b"], img_size=768, embed_dim=16, depth=2, num_heads=1, global_attn_indexes=(1,))
    model = random_sam(cfg, seed=4)
    path = export_onnx(model, "sam_vit", tmp_path / "big", parts="encoder")["encoder"]
    x = torch.randn(1, 3, 768, 768, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        ref = model.image_encoder(x).numpy()
    out = session(path).run(None, {"image": x.numpy()})[0]
    assert out.shape == (1, 256, 48, 48)
    assert np.abs(out - ref).max() <= TOL * np.abs(ref).max()


def test_mobile_sam_encoder(tmp_path):
    cfg = config_with(MODELS["mobile_sam"], img_size=128, depths=(1, 1, 1, 1), embed_dims=(16, 32, 40, 80),
                      num_heads=(1, 2, 5, 5))
    torch.save(random_sam(cfg, seed=2).state_dict(), tmp_path / "mobile.pt")
    sam = SAM(str(tmp_path / "mobile.pt"), device="cpu")
    path = sam.export(file=tmp_path / "enc.onnx", parts="encoder")
    assert path == {"encoder": tmp_path / "enc.onnx"}
    x = torch.randn(1, 3, sam.model.img_size, sam.model.img_size, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = sam.model.image_encoder(x).numpy()
    out = session(path["encoder"]).run(None, {"image": x.numpy()})[0]
    assert np.abs(out - ref).max() <= TOL * np.abs(ref).max()


def test_save_round_trip(small_ckpt, tmp_path):
    sam = SAM(small_ckpt, device="cpu")
    saved = sam.save(tmp_path / "sub" / "copy.pt")
    assert saved == tmp_path / "sub" / "copy.pt" and [f.name for f in saved.parent.iterdir()] == ["copy.pt"]
    sd = torch.load(saved, weights_only=True)
    assert sd.keys() == torch.load(small_ckpt, weights_only=True).keys()  # the official key names
    again = SAM(str(saved), device="cpu")
    img = test_image()
    a = sam(img, bboxes=[[20, 30, 150, 170]], points=[[[60, 90]]], labels=[[1]], multimask_output=True)[0]
    b = again(img, bboxes=[[20, 30, 150, 170]], points=[[[60, 90]]], labels=[[1]], multimask_output=True)[0]
    assert torch.equal(a.masks.data, b.masks.data) and torch.equal(a.boxes.conf, b.boxes.conf)
    assert torch.equal(a.low_res_logits, b.low_res_logits)


@pytest.mark.filterwarnings("ignore:.*is a custom-size SAM 2")
def test_sam2_is_not_exported_but_saved(tmp_path):
    cfg = config_with(MODELS["sam2.1_t"], img_size=256, embed_dim=32, num_heads=1, stages=(1, 1, 2, 1),
                      global_att_blocks=(3,))
    torch.save(random_sam(cfg).state_dict(), tmp_path / "sam2.pt")
    sam = SAM(str(tmp_path / "sam2.pt"), device="cpu")
    with pytest.raises(NotAvailableError, match="SAM 2"):
        sam.export(file=tmp_path / "x")
    assert not list(tmp_path.glob("*.onnx"))
    again = SAM(str(sam.save(tmp_path / "copy.pt")), device="cpu")
    assert all(torch.equal(v, again.model.state_dict()[k]) for k, v in sam.model.state_dict().items())


@pytest.mark.parametrize("module", ["onnx", "onnxscript"])
def test_missing_package(small_ckpt, tmp_path, monkeypatch, module):
    sam = SAM(small_ckpt, device="cpu")
    monkeypatch.setitem(sys.modules, module, None)  # `import module` now raises ImportError
    with pytest.raises(MissingDependencyError, match=r"pip install 'segany\[export\]'"):
        sam.export(file=tmp_path / "x")
    assert not list(tmp_path.iterdir())


def test_bad_options(small_ckpt, tmp_path):
    sam = SAM(small_ckpt, device="cpu")
    with pytest.raises(ConfigError, match="onnx"):
        sam.export(format="torchscript")
    with pytest.raises(ConfigError, match="encoder"):
        sam.export(file=tmp_path / "x", parts="neck")
    assert main(["export", f"model={small_ckpt}", "format=engine"]) == 2


def test_default_file_names_follow_the_name_given_not_the_cache_file(small_ckpt, tmp_path, monkeypatch):
    import shutil

    from segany.hub import weights_dir

    shutil.copy(small_ckpt, weights_dir() / "sam_vit_b_01ec64.pth")  # the cache's name for sam_b.pt
    monkeypatch.chdir(tmp_path)
    paths = SAM("sam_b.pt").export(parts="decoder")
    assert paths["decoder"] == Path("sam_b_decoder.onnx") and (tmp_path / "sam_b_decoder.onnx").is_file()


@pytest.fixture()
def stub_exporter(monkeypatch):
    """The exporter replaced by one that writes an empty file where the real one writes (what is
    tested is where the files go)."""
    def write(module, args, path, *rest):
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"")

    monkeypatch.setattr("segany.onnx_export._export", write)


def test_file_naming_a_folder_writes_the_default_names_into_it(small_ckpt, tmp_path, capsys, stub_exporter):
    import os

    (tmp_path / "out2").mkdir()
    assert main(["export", f"model={small_ckpt}", f"file={tmp_path / 'out2'}", "device=cpu"]) == 0
    inside = {part: tmp_path / "out2" / f"small_sam_{part}.onnx" for part in ("encoder", "decoder")}
    assert capsys.readouterr().out.splitlines() == [f"{part}: {path}" for part, path in inside.items()]
    assert all(p.is_file() for p in inside.values()) and [f.name for f in tmp_path.iterdir()] == ["out2"]
    sam = SAM(small_ckpt, device="cpu")
    # a path ending in a separator names a folder too (made if need be); one part takes its default name there
    assert sam.export(file=f"{tmp_path / 'new'}{os.sep}", parts="decoder") == {
        "decoder": tmp_path / "new" / "small_sam_decoder.onnx"}
    # a stem and one part's .onnx file are as before
    assert sam.export(file=tmp_path / "stem") == {p: tmp_path / f"stem_{p}.onnx" for p in ("encoder", "decoder")}
    assert sam.export(file=tmp_path / "out2" / "e.onnx", parts="encoder") == {"encoder": tmp_path / "out2" / "e.onnx"}
