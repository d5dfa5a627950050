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
    assert assert_same_outputs(got, want) == want.tensors()


@pytest.mark.parametrize("names", [{"blocks.0"}, {"blocks.1.attn.qkv", "blocks.2.mlp.lin1"}, {"blocks.2.mlp"}])
def test_vit_few_hooks_keep_their_outputs_while_the_rest_runs_fused(vit_pair, names):
    """A hook keeps a block's output while the next blocks run: nothing may write into it later
    (before, the next block added its residual into it in place)."""
    ours, ref = vit_pair
    x = torch.randn(1, 3, 512, 512, generator=torch.Generator().manual_seed(1))
    with OutputRecorder(ours.image_encoder, names) as got, OutputRecorder(ref.image_encoder, names) as want:
        out, expected = _encode(ours, x), _encode(ref, x)
    assert (out - expected).abs().max() <= 1e-4
    assert assert_same_outputs(got, want) == want.tensors() == len(names)


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
        assert assert_same_outputs(got, want) == want.tensors()
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


def _scale_output(factor: float):
    return lambda _m, _args, out: out * factor


def _scale_first_input(factor: float):
    return lambda _m, args: (args[0] * factor, *args[1:])


def _scale_queries(_m, _args, kwargs, out):  # a with_kwargs hook on a two-way block: (queries, keys) out
    assert set(kwargs) == {"queries", "keys", "query_pe", "key_pe"}  # called with keywords, as the reference
    return out[0] * 0.8, out[1]


def _unpack_one_input(_m, args):
    (x,) = args  # the usual idiom: a block takes one tensor, as in the reference
    return (x * 1.1,)


def _wrap_forward(module: nn.Module, factor: float) -> None:
    forward = module.forward
    module.forward = lambda *a, **kw: forward(*a, **kw) * factor  # as accelerate's hooks replace forward


def _decoder_kwargs(_m, args, kwargs):  # a pre-hook on the mask decoder: the reference's arguments
    assert not args and set(kwargs) == {"image_embeddings", "image_pe", "sparse_prompt_embeddings",
                                        "dense_prompt_embeddings", "multimask_output"}
    assert isinstance(kwargs["image_embeddings"], torch.Tensor)
    return args, {**kwargs, "image_pe": kwargs["image_pe"] * 1.5}


def _edit_in_place(_m, args):  # a pre-hook on the two-way transformer: the reference's per-prompt copies
    image, pe, tokens = args
    assert image.shape[0] == pe.shape[0] == tokens.shape[0]
    image.mul_(0.5)
    pe.mul_(2.0)


def _without_bias(layer: nn.Module) -> nn.Module:
    """The same layer as a new torch.nn module without a bias (the bias dropped)."""
    if isinstance(layer, nn.Linear):
        new = nn.Linear(layer.in_features, layer.out_features, bias=False)
    else:
        new = nn.ConvTranspose2d(layer.in_channels, layer.out_channels, 2, stride=2, bias=False)
    new.weight.data.copy_(layer.weight.data)
    return new


def _replace(parent: nn.Module, name: str, make) -> None:
    setattr(parent, name, make(getattr(parent, name)))


INTERVENTIONS = {
    "a hook on the prompt encoder's dense embedding": lambda m: m.prompt_encoder.register_forward_hook(
        lambda _m, _a, out: (out[0], out[1] + 0.5)),
    "a kwargs pre-hook on the mask decoder": lambda m: m.mask_decoder.register_forward_pre_hook(
        _decoder_kwargs, with_kwargs=True),
    "a pre-hook editing the two-way transformer's inputs in place": lambda m: (
        m.mask_decoder.transformer.register_forward_pre_hook(_edit_in_place)),
    "a projection without a bias": lambda m: _replace(m.mask_decoder.transformer.layers[1].cross_attn_image_to_token,
                                                      "q_proj", _without_bias),
    "an upscaling conv without a bias": lambda m: m.mask_decoder.output_upscaling.__setitem__(
        0, _without_bias(m.mask_decoder.output_upscaling[0])),
    "a block's MLP replaced by an identity": lambda m: setattr(m.image_encoder.blocks[1], "mlp", nn.Identity()),
    "a block's attention replaced by an identity": lambda m: setattr(m.image_encoder.blocks[2], "attn", nn.Identity()),
    "a forward hook that changes a block's output": lambda m: m.image_encoder.blocks[1].register_forward_hook(
        _scale_output(1.3)),
    "a pre-hook that changes an MLP's input": lambda m: m.image_encoder.blocks[2].mlp.register_forward_pre_hook(
        _scale_first_input(0.7)),
    "a pre-hook that unpacks a block's one input": lambda m: m.image_encoder.blocks[3].register_forward_pre_hook(
        _unpack_one_input),
    "a kwargs hook on a two-way block": lambda m: m.mask_decoder.transformer.layers[0].register_forward_hook(
        _scale_queries, with_kwargs=True),
    "a pre-hook on the two-way transformer's image": lambda m: m.mask_decoder.transformer.register_forward_pre_hook(
        _scale_first_input(1.2)),
    "a hook on the prompt encoder's positional encoding": lambda m: m.prompt_encoder.pe_layer.register_forward_hook(
        _scale_output(0.5)),
    "a hook on the mask decoder's output": lambda m: m.mask_decoder.register_forward_hook(
        lambda _m, _a, out: (out[0] - 1.0, out[1])),
    "forward replaced on q/k/v": lambda m: _wrap_forward(m.image_encoder.blocks[0].attn.qkv, 0.9),
    "forward replaced on the upscaling": lambda m: _wrap_forward(m.mask_decoder.output_upscaling, 1.5),
    "a GELU of the upscaling replaced": lambda m: m.mask_decoder.output_upscaling.__setitem__(2, nn.Identity()),
    "a GELU of an MLP replaced": lambda m: setattr(m.image_encoder.blocks[3].mlp, "act", nn.Tanh()),
}


@pytest.mark.parametrize("name", list(INTERVENTIONS))
def test_interventions_act_as_in_the_reference(name):
    """A hook that changes what a module takes or gives, a forward replaced on the instance, or a
    module replaced by another: ours and Meta's model, each changed the same way, give the same
    IoU and low-res logits for a box (which differ from the unchanged model's)."""
    ours = random_sam(VIT, seed=2).eval()
    ref = meta_twin(ours, VIT)
    _, low0, *_ = _two_boxes(ours, ref)
    for model in (ours, ref):
        INTERVENTIONS[name](model)
    iou, low, ref_iou, ref_low = _two_boxes(ours, ref)
    assert (low - ref_low).abs().max() <= 1e-4 and (iou - ref_iou).abs().max() <= 1e-4
    assert (low - low0).abs().max() > 1e-2  # the change took effect


def _two_boxes(ours: nn.Module, ref: nn.Module) -> tuple[torch.Tensor, ...]:
    """IoU and low-res logits of two boxes through our Predictor, then through Meta's SamPredictor."""
    from segment_anything import SamPredictor

    img, boxes = test_image(200, 260), np.array([[40, 50, 180, 170], [10, 20, 120, 90]])
    pred = Predictor(model=ours, config=VIT)
    pred.set_image(img)
    result = pred(bboxes=boxes, multimask_output=False)[0]
    ref_pred = SamPredictor(ref)
    ref_pred.set_image(img[..., ::-1].copy())
    ref_boxes = ref_pred.transform.apply_boxes_torch(torch.as_tensor(boxes, dtype=torch.float), img.shape[:2])
    _, ref_iou, ref_low = ref_pred.predict_torch(None, None, ref_boxes, multimask_output=False, return_logits=True)
    return result.boxes.conf, result.low_res_logits, ref_iou[:, 0], ref_low[:, 0]


def test_a_hook_on_all_modules_acts_as_in_the_reference():
    """A global forward hook (on every module of every model) that changes every linear layer's output."""
    ours = random_sam(VIT, seed=3).eval()
    ref = meta_twin(ours, VIT)
    handle = torch.nn.modules.module.register_module_forward_hook(
        lambda m, _a, out: out * 1.05 if isinstance(m, nn.Linear) else None)
    try:
        iou, low, ref_iou, ref_low = _two_boxes(ours, ref)
    finally:
        handle.remove()
    assert (low - ref_low).abs().max() <= 1e-4 and (iou - ref_iou).abs().max() <= 1e-4
