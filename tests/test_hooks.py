"""Forward hooks and stand-in modules (a LoRA wrapper, say) see and do what they would in the
reference implementations: the fused CPU paths (products on module weights, residuals added in
place, shared output buffers, maps by bands and chunks) give way to module-by-module calls."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from conftest import OutputRecorder, assert_same_outputs, config_with, meta_twin, random_sam, test_image
from segany.engine.predictor import Predictor
from segany.models import MODELS

# 32×32 tokens: the encoder's products have more rows than go through oneDNN on an AVX2 CPU, so the
# residuals are added in place (common.ONEDNN_FP32_MAX_ROWS), as at full size.
VIT = config_with(MODELS["sam_b"], img_size=512, embed_dim=64, depth=4, num_heads=4, global_attn_indexes=(1, 3),
                  window_size=7)


class LoRA(nn.Module):
    """A low-rank adapter around a linear layer, as PEFT's: it has no ``weight`` of its own."""

    def __init__(self, base: nn.Linear, rank: int = 2, seed: int = 0) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.base = base
        self.down = nn.Parameter(torch.randn(rank, base.in_features, generator=g) * 0.3)
        self.up = nn.Parameter(torch.randn(base.out_features, rank, generator=g) * 0.3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.base(x) + x @ self.down.t() @ self.up.t()


@pytest.fixture(scope="module")
def vit_pair():
    ours = random_sam(VIT, seed=2).eval()
    return ours, meta_twin(ours, VIT)


def _tensors(recorder: OutputRecorder) -> int:
    """How many output tensors ``recorder`` kept (a tuple output counts each of its tensors)."""
    return sum(len(o) if isinstance(o, tuple) else 1 for outs in recorder.outputs.values() for o in outs)


def _encode(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    with torch.inference_mode():
        return model.image_encoder(x)


def test_vit_hooks_on_every_module_see_the_reference_outputs(vit_pair):
    ours, ref = vit_pair
    x = torch.randn(1, 3, 512, 512, generator=torch.Generator().manual_seed(0))
    with OutputRecorder(ours.image_encoder) as got, OutputRecorder(ref.image_encoder) as want:
        out, expected = _encode(ours, x), _encode(ref, x)
    assert (out - expected).abs().max() <= 1e-4
    assert got.outputs.keys() == want.outputs.keys()
    # every module's output: the blocks, attentions, q/k/v and MLP products, norms, the neck
    assert assert_same_outputs(got, want) == _tensors(want)


@pytest.mark.parametrize("names", [{"blocks.0"}, {"blocks.1.attn.qkv", "blocks.2.mlp.lin1"}, {"blocks.2.mlp"}])
def test_vit_few_hooks_keep_their_outputs_while_the_rest_runs_fused(vit_pair, names):
    """A hook keeps a block's output while the next blocks run: nothing may write into it later
    (before, the next block added its residual into it in place)."""
    ours, ref = vit_pair
    x = torch.randn(1, 3, 512, 512, generator=torch.Generator().manual_seed(1))
    with OutputRecorder(ours.image_encoder, names) as got, OutputRecorder(ref.image_encoder, names) as want:
        out, expected = _encode(ours, x), _encode(ref, x)
    assert (out - expected).abs().max() <= 1e-4
    assert assert_same_outputs(got, want) == len(names)


def test_vit_stand_in_layers_are_called(vit_pair):
    ours, ref = vit_pair
    x = torch.randn(1, 3, 512, 512, generator=torch.Generator().manual_seed(2))
    plain = _encode(ours, x)
    originals = {}
    try:
        for model in (ours, ref):
            enc = model.image_encoder
            for i, (blk, attr) in enumerate([(enc.blocks[0].attn, "qkv"), (enc.blocks[1].attn, "proj"),
                                             (enc.blocks[2].mlp, "lin1"), (enc.blocks[3].mlp, "lin2")]):
                originals[(id(model), i)] = (blk, attr, getattr(blk, attr))
                setattr(blk, attr, LoRA(getattr(blk, attr), seed=i))
        out, expected = _encode(ours, x), _encode(ref, x)
    finally:
        for blk, attr, layer in originals.values():
            setattr(blk, attr, layer)
    assert (out - expected).abs().max() <= 1e-4
    assert (out - plain).abs().max() > 1e-2  # the adapters took part


def test_decoder_hooks_see_the_reference_outputs(vit_pair):
    """Hooks on every module of the mask decoder, through a Predictor box prompt against Meta's
    SamPredictor: the prepared and shared image, the tokens left out of the final attention, the
    single-mask output's hypernetworks left out and the upscaling of the unpadded part only, all
    give way."""
    from segment_anything import SamPredictor

    ours, ref = vit_pair
    img = test_image(200, 260)
    box = [40, 50, 180, 170]
    ref_pred = SamPredictor(ref)
    ref_pred.set_image(img[..., ::-1].copy())
    pred = Predictor(model=ours, config=VIT)
    pred.set_image(img)
    for multimask in (False, True):
        with OutputRecorder(ours.mask_decoder) as got, OutputRecorder(ref.mask_decoder) as want:
            result = pred(bboxes=box, multimask_output=multimask)[0]
            _, ref_scores, _ = ref_pred.predict(box=np.array(box), multimask_output=multimask)
        assert got.outputs.keys() == want.outputs.keys()
        assert assert_same_outputs(got, want) == _tensors(want)
        assert np.allclose(np.sort(result.boxes.conf.numpy())[::-1], np.sort(ref_scores)[::-1], atol=1e-4)



@pytest.mark.parametrize("name, attn, mlp", [
    ("sam", "blocks.0.attn", ("blocks.0.mlp", "lin1", "lin2")),
    ("mobile_sam", "layers.1.blocks.0.attn", ("layers.1.blocks.0.mlp", "fc1", "fc2")),
    ("sam2", "trunk.blocks.0.attn", ("trunk.blocks.0.mlp.layers", "0", "1")),
])
def test_adapters_train_in_every_encoder(name, attn, mlp):
    """LoRA adapters on an encoder's q/k/v and MLP layers take part and get gradients (before,
    the fused products read the wrapped layers' weights and passed the adapters by)."""
    from conftest import SMALL_VIT

    from segany.models import build_model

    config = {"sam": SMALL_VIT, "mobile_sam": config_with(MODELS["mobile_sam"], img_size=256),
              "sam2": config_with(MODELS["sam2.1_t"], img_size=256, embed_dim=32, num_heads=2, stages=(1, 1, 2, 1),
                                  global_att_blocks=(3,))}[name]
    torch.manual_seed(0)
    model = build_model(config)
    encoder = model.image_encoder
    x = torch.randn(1, 3, 256, 256)

    def embedding() -> torch.Tensor:
        out = model.encode_image(x)
        return out if isinstance(out, torch.Tensor) else out["image_embed"]

    with torch.no_grad():
        plain = embedding()
    attention = encoder.get_submodule(attn)
    attention.qkv = LoRA(attention.qkv)
    block_mlp = encoder.get_submodule(mlp[0])
    adapters = [attention.qkv]
    for i, layer in enumerate(mlp[1:]):
        setattr(block_mlp, layer, LoRA(getattr(block_mlp, layer), seed=i + 1))
        adapters.append(getattr(block_mlp, layer))
    with torch.no_grad():
        assert (embedding() - plain).abs().max() > 1e-3  # the adapters took part in inference
    embedding().pow(2).mean().backward()
    for adapter in adapters:
        assert adapter.down.grad is not None and adapter.down.grad.abs().sum() > 0
