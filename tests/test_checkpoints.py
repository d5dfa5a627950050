"""Checkpoint loading as SPEC §1 says: names and paths, file layouts, recognition from tensors, refusals."""

from __future__ import annotations

import os
import pickle
import warnings
import zipfile
from pathlib import Path

import pytest
import torch

from conftest import SMALL_VIT, random_sam
from segany import SAM
from segany.checkpoints import config_with, infer_config, load_model, read_state_dict
from segany.errors import (
    CheckpointError,
    CheckpointNotFoundError,
    CorruptCheckpointError,
    StateDictMismatchError,
    UnknownArchitectureError,
    UnsafeCheckpointError,
)
from segany.models import MODELS, build_model


def _same_weights(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


@pytest.mark.parametrize("name", ["sam_b", "sam_l", "sam_h", "mobile_sam"])
def test_architecture_recognised_from_tensors(name):
    with torch.device("meta"):
        sd = build_model(name).state_dict()
    assert infer_config(sd).name == name


def test_meta_style_pth_loads(tmp_path):
    model = random_sam(SMALL_VIT, seed=2)
    path = tmp_path / "sam_vit_b_01ec64.pth"
    torch.save(model.state_dict(), path)
    loaded, cfg = load_model(path)
    assert _same_weights(loaded, model)
    assert cfg.params["encoder"]["depth"] == 4 and cfg.params["encoder"]["global_attn_indexes"] == (1, 3)


def test_ultralytics_style_name_and_renamed_file(tmp_path, small_ckpt):
    for name in ("sam_b.pt", "my-finetuned-model.bin"):
        path = tmp_path / name
        path.write_bytes(open(small_ckpt, "rb").read())
        model = SAM(str(path))
        assert model.model.image_encoder.img_size == 256
        assert len(model.model.image_encoder.blocks) == 4


def test_model_key_wrapper_and_module_prefix(tmp_path):
    model = random_sam(SMALL_VIT, seed=4)
    wrapped = tmp_path / "wrapped.pt"
    torch.save({"model": model.state_dict(), "epoch": torch.tensor(3)}, wrapped)
    prefixed = tmp_path / "ddp.pt"
    torch.save({"module." + k: v for k, v in model.state_dict().items()}, prefixed)
    for path in (wrapped, prefixed):
        loaded, _ = load_model(path)
        assert _same_weights(loaded, model)


def test_small_custom_config_is_read_off_the_state_dict(tmp_path):
    cfg = config_with(MODELS["sam_b"], img_size=320, embed_dim=48, depth=3, num_heads=3,
                      global_attn_indexes=(2,), window_size=5, mlp_ratio=2.0)
    model = random_sam(cfg, seed=6)
    path = tmp_path / "custom.pt"
    torch.save(model.state_dict(), path)
    loaded, found = load_model(path)
    assert found.params["encoder"] == {**cfg.params["encoder"]}
    assert _same_weights(loaded, model)


def _edited_checkpoint(tmp_path, edit) -> str:
    """A small random SAM's state dict, changed by ``edit(sd)``, saved as a checkpoint file."""
    sd = random_sam(SMALL_VIT).state_dict()
    edit(sd)
    path = tmp_path / "edited.pt"
    torch.save(sd, path)
    return str(path)


def test_missing_key_names_the_key(tmp_path):
    path = _edited_checkpoint(tmp_path, lambda sd: sd.pop("mask_decoder.iou_token.weight"))
    with pytest.raises(StateDictMismatchError, match=r"missing keys: mask_decoder\.iou_token\.weight"):
        load_model(path)


def test_unexpected_and_misshaped_keys_are_named(tmp_path):
    path = _edited_checkpoint(tmp_path, lambda sd: sd.update({"extra.weight": torch.zeros(3),
                                                              "mask_decoder.iou_token.weight": torch.zeros(1, 7)}))
    with pytest.raises(StateDictMismatchError) as e:
        load_model(path)
    assert "unexpected keys: extra.weight" in str(e.value)
    assert "mask_decoder.iou_token.weight" in str(e.value)


@pytest.mark.parametrize("key", ["prompt_encoder.no_mask_embed.weight", "image_encoder.blocks.0.mlp.lin1.weight",
                                 "mask_decoder.mask_tokens.weight"])
def test_tensor_the_architecture_is_read_from_missing_is_named(tmp_path, key):
    path = _edited_checkpoint(tmp_path, lambda sd: sd.update({key + "X": sd.pop(key)}))
    with pytest.raises(StateDictMismatchError, match=f"looks like a SAM ViT checkpoint, but it lacks the tensor {key}:"):
        load_model(path)


def test_impossible_shapes_are_a_mismatch_not_a_crash(tmp_path):
    path = _edited_checkpoint(tmp_path, lambda sd: sd.update({"image_encoder.patch_embed.proj.weight": torch.zeros(0)}))
    with pytest.raises(StateDictMismatchError, match="impossible shapes"):
        load_model(path)


def test_other_files_named_pt_are_not_called_unsafe(tmp_path):
    jpeg = tmp_path / "photo.pt"
    jpeg.write_bytes(b"\xff\xd8\xff\xe0" + bytes(200))
    plain = tmp_path / "plain.pt"
    with open(plain, "wb") as f:
        pickle.dump({"a": 1}, f, protocol=4)
    for path in (jpeg, plain):
        with pytest.raises(CorruptCheckpointError, match="is not a PyTorch checkpoint") as e:
            read_state_dict(path)
        assert not isinstance(e.value, UnsafeCheckpointError)
    wrapped = tmp_path / "lightning.ckpt"
    torch.save({"state_dict": random_sam(SMALL_VIT).state_dict(), "epoch": 3}, wrapped)
    with pytest.raises(CorruptCheckpointError, match=r"entries 'state_dict', 'epoch' are not tensors.*re-save"):
        read_state_dict(wrapped)


def test_truncated_file(tmp_path, small_ckpt):
    data = open(small_ckpt, "rb").read()
    path = tmp_path / "truncated.pt"
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(CorruptCheckpointError, match="truncated, damaged"):
        load_model(path)


@pytest.mark.parametrize("content", [b"", b"hello, this is not a checkpoint\n" * 10])
def test_file_that_is_not_a_checkpoint(tmp_path, content):
    path = tmp_path / "notes.pt"
    path.write_bytes(content)
    with pytest.raises(CorruptCheckpointError, match="notes.pt"):
        load_model(path)


def test_checkpoint_of_something_else(tmp_path):
    path = tmp_path / "resnet.pt"
    torch.save({"conv1.weight": torch.zeros(4, 3, 3, 3)}, path)
    with pytest.raises(UnknownArchitectureError, match="Supported: SAM ViT"):
        load_model(path)
    torch.save([1, 2, 3], path)
    with pytest.raises(CorruptCheckpointError, match="holds no state dict"):
        load_model(path)


class _Payload:
    def __reduce__(self):
        return (os.system, (f"touch {os.environ['SEGANY_MARKER']}",))


def test_pickle_that_carries_code_is_refused_and_never_runs(tmp_path, monkeypatch):
    marker = tmp_path / "pwned"
    monkeypatch.setenv("SEGANY_MARKER", str(marker))
    path = tmp_path / "evil.pt"
    torch.save({"image_encoder.x": torch.zeros(1), "payload": _Payload()}, path)
    assert zipfile.is_zipfile(path)
    with pytest.raises(UnsafeCheckpointError, match="needs to run code"):
        read_state_dict(path)
    assert not marker.exists()
    # A legacy (non-zip) pickle is refused the same way.
    legacy = tmp_path / "evil_legacy.pt"
    with open(legacy, "wb") as f:
        pickle.dump(_Payload(), f)
    with pytest.raises(CheckpointError):
        read_state_dict(legacy)
    assert not marker.exists()


def test_missing_file_and_unknown_name():
    with pytest.raises(CheckpointNotFoundError, match="sam_b"):
        SAM("definitely_not_a_model.pt")
    with pytest.raises(CheckpointNotFoundError):
        read_state_dict("/nonexistent/file.pt")


def test_sam2_checkpoint_gets_a_clear_message(tmp_path):
    # SAM 2 and SAM 2.1 are recognised from their tensors (loading and parity: tests/test_sam2.py) ...
    for name in ("sam2_t", "sam2.1_t"):
        with torch.device("meta"):
            sd = build_model(name).state_dict()
        assert infer_config(sd).name == name
    # ... and a file that only starts like one is refused with a message that names the missing tensor.
    path = tmp_path / "sam2_hiera_tiny.pt"
    torch.save({"model": {"image_encoder.trunk.patch_embed.proj.weight": torch.zeros(96, 3, 7, 7)}}, path)
    with pytest.raises(StateDictMismatchError, match="SAM 2 / SAM 2.1 checkpoint.*lacks the tensor image_encoder"):
        load_model(path)


@pytest.fixture(scope="module")
def small_sam2():
    """A small random SAM 2.1 (the size tests/test_sam2.py checks against Meta's): 2 heads, 256 px."""
    from conftest import randomize

    cfg = config_with(MODELS["sam2.1_t"], img_size=256, embed_dim=32, num_heads=2, stages=(1, 1, 2, 1),
                      global_att_blocks=(3,))
    return cfg, randomize(build_model(cfg), seed=5)


def test_lost_tensor_that_recognition_reads_is_named_before_the_shapes_it_causes(tmp_path, small_sam2):
    # Without memory_encoder.out_proj a SAM 2 reads as memory width = decoder width, and without
    # pos_embed a SAM ViT as one with no absolute positions at 1024 px: the load then fails on
    # shapes; the error must say what is missing, and not bury it under the shapes.
    _, sam2 = small_sam2
    sam2_sd = {k: v for k, v in sam2.state_dict().items() if not k.startswith("memory_encoder.out_proj.")}
    vit_sd = {k: v for k, v in random_sam(SMALL_VIT).state_dict().items() if k != "image_encoder.pos_embed"}
    cases = [(sam2_sd, "memory_encoder.out_proj.weight, memory_encoder.out_proj.bias", "(+10 more)"),
             (vit_sd, "image_encoder.pos_embed", "(+2 more)")]
    for sd, keys, rest in cases:
        path = tmp_path / "lost.pt"
        torch.save(sd, path)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the custom SAM 2 size warning
            with pytest.raises(StateDictMismatchError) as e:
                load_model(path)
        msg = str(e.value)
        assert f"missing keys: {keys} (" in msg and msg.index("missing keys") < msg.index("wrong shapes"), msg
        assert rest in msg, msg
    # At an official size nothing else shows the loss, so the official layout names it.
    with torch.device("meta"):
        sd = build_model("sam_b").state_dict()
    del sd["image_encoder.pos_embed"]
    with pytest.raises(StateDictMismatchError, match="like sam_b .*lacks the tensor image_encoder.pos_embed"):
        infer_config(sd)
    # A model made without those tensors still loads: their absence alone is no error.
    cfg = config_with(SMALL_VIT, img_size=1024, use_abs_pos=False)
    path = tmp_path / "no_abs_pos.pt"
    torch.save(random_sam(cfg).state_dict(), path)
    assert load_model(path)[1].params["encoder"]["use_abs_pos"] is False


def _damage(src: str, dest, fill: bytes) -> None:
    data = bytearray(Path(src).read_bytes())
    mid = len(data) // 2
    data[mid:mid + len(fill)] = fill
    dest.write_bytes(bytes(data))


def test_damaged_tensor_bytes_are_refused_not_loaded_as_nan(tmp_path, small_ckpt):
    # torch.load does not check the zip CRCs: damaged bytes in the middle load as NaN weights.
    path = tmp_path / "damaged.pt"
    _damage(small_ckpt, path, b"\xff" * 1000)  # 0xffffffff is a float32 NaN
    bad = [k for k, t in torch.load(path, weights_only=True).items() if not torch.isfinite(t).all()]
    assert bad, "the damage must reach a tensor"
    with pytest.raises(CorruptCheckpointError, match=r"is damaged: tensors hold NaN or infinite values: "
                                                     rf"{bad[0]}.*download it again"):
        load_model(path)
    # Large finite values, whose sum overflows to inf, are no damage.
    sd = random_sam(SMALL_VIT).state_dict()
    sd["mask_decoder.iou_token.weight"].fill_(3e38)
    torch.save(sd, path)
    assert torch.equal(read_state_dict(path)["mask_decoder.iou_token.weight"], sd["mask_decoder.iou_token.weight"])


def test_custom_sam2_size_warns_what_was_assumed_and_a_config_gives_the_real_values(tmp_path, small_sam2):
    cfg, model = small_sam2
    path = tmp_path / "custom_sam2.pt"
    torch.save({"model": model.state_dict()}, path)
    with pytest.warns(UserWarning, match=r"custom-size SAM 2.*num_heads=1, global_att_blocks=\(3,\), "
                                         r"window_spec=\(8, 4, 14, 7\), img_size=1024.*SAM\(path, config="
                      ) as record:
        load_model(path)
    assert len([w for w in record if "custom-size SAM 2" in str(w.message)]) == 1  # once per load
    real = config_with(infer_config(read_state_dict(path)), num_heads=2, img_size=256)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        loaded, found = load_model(path, config=real)
        sam = SAM(str(path), config=real)  # the same through the user-facing class
    assert found.params["encoder"] == cfg.params["encoder"] and _same_weights(loaded, model)
    assert sam.config.params["encoder"] == cfg.params["encoder"] and _same_weights(sam.model, model)
