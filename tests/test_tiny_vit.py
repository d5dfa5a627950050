"""Parity of MobileSAM's TinyViT encoder (and the whole MobileSAM model) with the reference package."""

from __future__ import annotations

import warnings

import pytest
import torch

from conftest import OutputRecorder, assert_same_outputs
from segany.models import build_model
from segany.models.tiny_vit import TinyViT

with warnings.catch_warnings():
    # mobile_sam imports deprecated timm paths and re-registers timm's tiny_vit models.
    warnings.simplefilter("ignore")
    mobile_sam = pytest.importorskip("mobile_sam")
    from mobile_sam.modeling import TinyViT as RefTinyViT

MOBILE_SAM = dict(
    embed_dims=[64, 128, 160, 320], depths=[2, 2, 6, 2], num_heads=[2, 4, 5, 10], window_sizes=[7, 7, 14, 7]
)
TOL = 1e-4


def _perturbed(state: dict[str, torch.Tensor], seed: int = 0) -> dict[str, torch.Tensor]:
    """Random weights that leave nothing at its (often zero or one) initial value."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for k, v in state.items():
        if v.is_floating_point():
            if k.endswith("running_var"):
                v = torch.rand(v.shape, generator=g) + 0.5  # must stay positive
            else:
                v = v + 0.1 * torch.randn(v.shape, generator=g)
        out[k] = v
    return out


def _same_weights(ours: torch.nn.Module, ref: torch.nn.Module) -> None:
    state = _perturbed(ours.state_dict())
    ours.load_state_dict(state)
    ref.load_state_dict(state)  # strict: the key sets and shapes are identical
    ours.eval()
    ref.eval()  # after loading: the reference caches its gathered attention biases in eval()


def _ref_encode(ref: RefTinyViT, x: torch.Tensor) -> torch.Tensor:
    """The reference forward, whose final reshape is hard-coded to a 64×64 grid (1024 input)."""
    x = ref.patch_embed(x)
    for layer in ref.layers:
        x = layer(x)
    grid = x.shape[1] ** 0.5
    x = x.view(x.shape[0], int(grid), int(grid), -1).permute(0, 3, 1, 2)
    return ref.neck(x)


@torch.no_grad()
@pytest.mark.parametrize("img_size", [1024, 256])
def test_encoder_parity(img_size: int) -> None:
    torch.manual_seed(0)
    ours = TinyViT(img_size=img_size, **MOBILE_SAM)
    ref = RefTinyViT(img_size=img_size, drop_path_rate=0.0, **MOBILE_SAM)
    _same_weights(ours, ref)
    x = torch.randn(1, 3, img_size, img_size, generator=torch.Generator().manual_seed(1))
    out = ours(x)
    assert out.shape == (1, 256, img_size // 16, img_size // 16)
    expected = ref(x) if img_size == 1024 else _ref_encode(ref, x)
    assert (out - expected).abs().max().item() <= TOL


def test_cpu_inference_paths_match_reference(monkeypatch: pytest.MonkeyPatch) -> None:
    """The first stage by bands of rows and the MLPs by chunks of tokens (CPU inference), each with
    a part left over at the end, and the plain ops that autograd takes, all give the reference's values."""
    from segany.models import common, tiny_vit

    torch.manual_seed(0)
    ours = TinyViT(img_size=288, **MOBILE_SAM)  # a 72-row first stage: 4 bands of 16 and one of 8
    ref = RefTinyViT(img_size=288, drop_path_rate=0.0, **MOBILE_SAM)
    _same_weights(ours, ref)
    x = torch.randn(1, 3, 288, 288, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = _ref_encode(ref, x)
        monkeypatch.setattr(tiny_vit, "CPU_BANDS_MIN_ELEMENTS", 0)
        monkeypatch.setattr(common, "CPU_MLP_ROWS", 1000)  # 5184 tokens in the second stage
        calls = []
        bands = tiny_vit.MBConv._forward_in_bands
        monkeypatch.setattr(tiny_vit.MBConv, "_forward_in_bands", lambda self, t: calls.append(1) or bands(self, t))
        assert (ours(x) - expected).abs().max().item() <= TOL
        assert len(calls) == 2  # both blocks of the first stage went by bands
    with torch.enable_grad():
        out = ours(x.requires_grad_())
        assert (out - expected).abs().max().item() <= TOL
        out.sum().backward()  # the ops autograd takes are out of place
        assert len(calls) == 2 and x.grad is not None and torch.isfinite(x.grad).all()


def test_training_mode_keeps_the_whole_map_for_batch_norm(monkeypatch: pytest.MonkeyPatch) -> None:
    """A model in train mode under no_grad (a frozen encoder being fine-tuned around) normalises
    the whole map with its batch statistics and updates them once: no bands there."""
    import copy

    from segany.models import tiny_vit

    monkeypatch.setattr(tiny_vit, "CPU_BANDS_MIN_ELEMENTS", 0)
    torch.manual_seed(0)
    block = tiny_vit.MBConv(16, 4.0).train()
    torch.nn.init.ones_(block.conv3.bn.weight)
    x = torch.randn(1, 16, 40, 24).contiguous(memory_format=torch.channels_last)
    plain, no_grad = copy.deepcopy(block), copy.deepcopy(block)
    expected = plain(x).detach()  # autograd on: the plain ops
    with torch.no_grad():
        out = no_grad(x)
    assert (out - expected).abs().max().item() <= 1e-5
    assert no_grad.conv1.bn.num_batches_tracked.item() == 1
    assert torch.allclose(no_grad.conv1.bn.running_mean, plain.conv1.bn.running_mean)


def test_state_dict_matches_reference() -> None:
    ours = TinyViT(**MOBILE_SAM).state_dict()
    ref = RefTinyViT(img_size=1024, **MOBILE_SAM).state_dict()
    assert {k: v.shape for k, v in ours.items()} == {k: v.shape for k, v in ref.items()}


def test_parameter_count() -> None:
    assert sum(p.numel() for p in build_model("mobile_sam").parameters()) == 10_130_092


@torch.no_grad()
def test_mobile_sam_parity() -> None:
    torch.manual_seed(0)
    ours = build_model("mobile_sam")
    ref = mobile_sam.sam_model_registry["vit_t"]()
    _same_weights(ours, ref)
    g = torch.Generator().manual_seed(2)
    x = torch.randn(1, 3, 1024, 1024, generator=g)
    emb = ours.encode_image(x)
    ref_emb = ref.image_encoder(x)
    assert (emb - ref_emb).abs().max().item() <= TOL

    boxes = torch.tensor([[100.0, 200.0, 600.0, 700.0], [50.0, 40.0, 900.0, 1000.0]])
    masks, iou = ours.decode(emb, boxes=boxes)
    sparse, dense = ref.prompt_encoder(points=None, boxes=boxes, masks=None)
    ref_masks, ref_iou = ref.mask_decoder(
        image_embeddings=ref_emb,
        image_pe=ref.prompt_encoder.get_dense_pe(),
        sparse_prompt_embeddings=sparse,
        dense_prompt_embeddings=dense,
        multimask_output=True,
    )
    assert masks.shape == ref_masks.shape == (2, 3, 256, 256)
    assert (masks - ref_masks).abs().max().item() <= TOL
    assert (iou - ref_iou).abs().max().item() <= TOL


@pytest.mark.parametrize("hooked", ["all", "few"])
def test_hooks_see_the_reference_outputs(monkeypatch: pytest.MonkeyPatch, hooked: str) -> None:
    """Hooks on every module, or on a few while the rest goes by bands and chunks: each sees what
    MobileSAM's hooks would see (where the layouts agree: its patch merging gives tokens, ours
    maps), before MobileSAM's own in-place adds write into the outputs."""
    from segany.models import common, tiny_vit

    monkeypatch.setattr(tiny_vit, "CPU_BANDS_MIN_ELEMENTS", 0)
    monkeypatch.setattr(common, "CPU_MLP_ROWS", 100)
    torch.manual_seed(0)
    ours = TinyViT(img_size=256, **MOBILE_SAM)
    ref = RefTinyViT(img_size=256, drop_path_rate=0.0, **MOBILE_SAM)
    _same_weights(ours, ref)
    names = {n for n, _ in ours.named_modules() if n} if hooked == "all" else {
        "patch_embed.seq.0", "layers.0.blocks.0", "layers.0.blocks.1.conv2", "layers.1.blocks.0.mlp.fc1",
        "layers.1.blocks.1.mlp", "layers.1.blocks.1.mlp.norm", "layers.1.downsample.conv1.bn"}
    x = torch.randn(1, 3, 256, 256, generator=torch.Generator().manual_seed(1))
    with torch.no_grad(), OutputRecorder(ours, names) as got, OutputRecorder(ref, names, copy=True) as want:
        out, expected = ours(x), _ref_encode(ref, x)
    assert (out - expected).abs().max().item() <= TOL
    # every output of every module both have (MobileSAM's GELUs are modules, ours functions)
    assert assert_same_outputs(got, want, TOL) == want.tensors(got.outputs)
    assert hooked == "all" or want.tensors() == len(names)


@pytest.mark.parametrize("change", ["patch_embed.seq.1", "layers.0.blocks.0.conv2", "layers.1.downsample.conv1",
                                    "layers.0.blocks.1.conv2 replaced", "layers.1.downsample.conv1.c replaced"])
def test_replaced_modules_act_as_in_the_reference(change: str) -> None:
    """A module changed alike in both models (a GELU or a block's conv replaced by an identity, a
    conv by one with a bias, a hook on a conv-and-norm): the same embedding as MobileSAM's."""
    torch.manual_seed(0)
    ours = TinyViT(img_size=256, **MOBILE_SAM)
    ref = RefTinyViT(img_size=256, drop_path_rate=0.0, **MOBILE_SAM)
    _same_weights(ours, ref)
    x = torch.randn(1, 3, 256, 256, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        plain = ours(x)
        for model in (ours, ref):
            if change.endswith("seq.1"):
                model.patch_embed.seq[1] = torch.nn.Identity()
            elif change == "layers.0.blocks.1.conv2 replaced":
                model.layers[0].blocks[1].conv2 = torch.nn.Identity()
            elif change == "layers.1.downsample.conv1.c replaced":  # by a conv with a bias
                conv = model.layers[1].downsample.conv1.c
                biased = torch.nn.Conv2d(conv.in_channels, conv.out_channels, 1)
                biased.weight.data.copy_(conv.weight.data)
                biased.bias.data.fill_(0.3)
                model.layers[1].downsample.conv1.c = biased
            else:
                model.get_submodule(change).register_forward_hook(lambda _m, _a, out: out * 0.5)
        out = ours(x)
        assert (out - _ref_encode(ref, x)).abs().max().item() <= TOL
    assert (out - plain).abs().max().item() > 1e-2
