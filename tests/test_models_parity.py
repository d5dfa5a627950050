"""Numerical parity of segany's SAM models with Meta's segment-anything on identical random weights."""

from __future__ import annotations

import sys

import numpy as np
import pytest
import torch

from conftest import SMALL_VIT, meta_twin, random_sam, test_image
from segany.checkpoints import config_with
from segany.engine.transforms import image_to_tensor, scale_coords
from segany.models import MODELS, build_model

TOL = 1e-4


def _meta_input(img_bgr: np.ndarray, size: int) -> torch.Tensor:
    """Meta's own preprocessing: ResizeLongestSide (torchvision on PIL) and ``Sam.preprocess``."""
    from segment_anything.utils.transforms import ResizeLongestSide

    rgb = img_bgr[..., ::-1].copy()
    x = torch.as_tensor(ResizeLongestSide(size).apply_image(rgb)).permute(2, 0, 1)[None].float()
    return x


def _prompt_cases(h: int, w: int, size: int, rng: np.random.Generator):
    """(name, points, labels, boxes, mask_input) in the input frame, as tensors."""
    inp = (round(h * size / max(h, w)), round(w * size / max(h, w)))

    def sc(a):
        return torch.as_tensor(scale_coords(np.asarray(a, float), (h, w), inp), dtype=torch.float32)
    box1 = sc([[0.2 * w, 0.2 * h], [0.6 * w, 0.7 * h]]).reshape(1, 4)
    boxes3 = sc(rng.uniform(0, 1, (3, 2, 2)) * [w, h]).reshape(3, 4).sort(dim=0).values
    boxes3 = torch.cat([boxes3[:, :2].minimum(boxes3[:, 2:]), boxes3[:, :2].maximum(boxes3[:, 2:])], 1)
    pt1 = sc([[[0.5 * w, 0.5 * h]]])
    pts_multi = sc([[[0.3 * w, 0.3 * h], [0.7 * w, 0.6 * h], [0.1 * w, 0.9 * h]]])
    mask_in = torch.randn(2, 1, 4 * (size // 16), 4 * (size // 16)) * 3
    return [
        ("one box", None, None, box1, None),
        ("several boxes", None, None, boxes3, None),
        ("one point", pt1, torch.ones(1, 1, dtype=torch.int64), None, None),
        ("several points per object", pts_multi, torch.tensor([[1, 1, 1]]), None, None),
        ("negative point", pts_multi, torch.tensor([[1, 0, 1]]), None, None),
        ("box and points", pts_multi[:, :2], torch.tensor([[1, 0]]), box1, None),
        ("mask input", pt1.expand(2, -1, -1), torch.ones(2, 1, dtype=torch.int64), None, mask_in),
        ("mask input only", None, None, None, mask_in),
    ]


def _check_decoder(ours, ref, emb, h, w, size):
    rng = np.random.default_rng(0)
    for name, pts, lab, boxes, mask_in in _prompt_cases(h, w, size, rng):
        for multimask in (True, False):
            points = None if pts is None else (pts, lab)
            with torch.no_grad():
                low, iou = ours.decode(emb, points=points, boxes=boxes, mask_inputs=mask_in, multimask_output=multimask)
                sparse, dense = ref.prompt_encoder(points=points, boxes=boxes, masks=mask_in)
                rlow, riou = ref.mask_decoder(emb, ref.prompt_encoder.get_dense_pe(), sparse, dense, multimask)
            assert low.shape == rlow.shape, name
            assert (low - rlow).abs().max() <= TOL, f"{name}: logits differ by {(low - rlow).abs().max()}"
            assert (iou - riou).abs().max() <= TOL, f"{name}: IoU differs by {(iou - riou).abs().max()}"
            inp = ours.input_size(h, w)
            up = ours.postprocess_masks(low, inp, (h, w))
            rup = ref.postprocess_masks(rlow, inp, (h, w))
            assert (up - rup).abs().max() <= TOL, name


@pytest.fixture(scope="module")
def vit_b_pair():
    """ViT-B at full size with random weights, and Meta's twin."""
    ours = random_sam(MODELS["sam_b"], seed=3)
    return ours, meta_twin(ours, MODELS["sam_b"])


def test_vit_b_full_size_embedding_and_decoder_parity(vit_b_pair):
    ours, ref = vit_b_pair
    img = test_image(480, 640, seed=2)
    x = image_to_tensor(img, ours.input_size(480, 640), torch.device("cpu"))
    assert torch.equal(x, _meta_input(img, 1024)), "resize differs from Meta's ResizeLongestSide"
    with torch.no_grad():
        emb = ours.encode_image(ours.preprocess(x))
        ref_emb = ref.image_encoder(ref.preprocess(x))
    assert emb.shape == (1, 256, 64, 64)
    assert (emb - ref_emb).abs().max() <= TOL
    _check_decoder(ours, ref, emb, 480, 640, 1024)


@pytest.mark.parametrize("shape", [(180, 240), (300, 97), (256, 256)])
def test_small_vit_parity(shape):
    ours = random_sam(SMALL_VIT, seed=5)
    ref = meta_twin(ours, SMALL_VIT)
    img = test_image(*shape, seed=1)
    x = image_to_tensor(img, ours.input_size(*shape), torch.device("cpu"))
    assert torch.equal(x, _meta_input(img, 256))
    with torch.no_grad():
        emb = ours.encode_image(ours.preprocess(x))
        ref_emb = ref.image_encoder(ref.preprocess(x))
    assert (emb - ref_emb).abs().max() <= TOL
    _check_decoder(ours, ref, emb, *shape, 256)


def test_batched_encoder_equals_single():
    ours = random_sam(SMALL_VIT, seed=7)
    x = torch.randn(3, 3, 256, 256) * 50
    with torch.no_grad():
        batched = ours.encode_image(x)
        single = torch.cat([ours.encode_image(x[i : i + 1]) for i in range(3)])
    assert (batched - single).abs().max() <= TOL


def _params_on_meta(name: str) -> int:
    with torch.device("meta"):
        return sum(p.numel() for p in build_model(name).parameters())


@pytest.mark.parametrize("name,count", [("sam_b", 93_735_472), ("sam_l", 312_342_832), ("sam_h", 641_090_608),
                                        ("mobile_sam", 10_130_092)])
def test_parameter_counts_equal_the_references(name, count):
    assert _params_on_meta(name) == count


def test_parameter_counts_match_meta_builders():
    from segment_anything import sam_model_registry

    for ours_name, ref_name in (("sam_b", "vit_b"), ("sam_l", "vit_l"), ("sam_h", "vit_h")):
        with torch.device("meta"):
            ref = sam_model_registry[ref_name]()
            ours = build_model(ours_name)
        assert sum(p.numel() for p in ours.parameters()) == sum(p.numel() for p in ref.parameters())
        assert {k: v.shape for k, v in ours.state_dict().items()} == {k: v.shape for k, v in ref.state_dict().items()}


def test_custom_size_config_builds():
    cfg = config_with(MODELS["sam_b"], img_size=512, depth=2, embed_dim=32, num_heads=2, global_attn_indexes=(1,))
    model = build_model(cfg)
    with torch.no_grad():
        assert model.encode_image(torch.zeros(1, 3, 512, 512)).shape == (1, 256, 32, 32)


def test_decoder_paths_agree():
    """The decoder's shared-image, projected-image, prepared-image and per-prompt-image paths give
    the same masks, with and without autograd (the fused oneDNN products and the in-place
    residuals run only without it), and none of them writes into the caller's embedding."""
    ours = random_sam(MODELS["sam_b"], seed=4)
    emb = torch.randn(1, 256, 64, 64).contiguous(memory_format=torch.channels_last)  # as the encoder gives it
    before = emb.clone()
    boxes = torch.tensor([[10.0, 20, 300, 400], [500, 100, 900, 700], [0, 0, 1023, 767], [200, 300, 260, 380]])
    points = (torch.tensor([[[100.0, 200], [400, 300]]] * 4), torch.tensor([[1, 0]] * 4))
    mask_in = torch.randn(4, 1, 256, 256)
    with torch.no_grad():
        prepared = ours.prepare_image(emb)
    for prompts in (dict(boxes=boxes), dict(points=points), dict(points=points, mask_inputs=mask_in)):
        with torch.no_grad():
            shared = ours.decode(emb, multimask_output=True, **prompts)
            variants = [
                ours.decode(emb.expand(4, -1, -1, -1).contiguous(), multimask_output=True, **prompts),
                ours.decode(prepared, multimask_output=True, **prompts),
            ]
            singles = [ours.decode(image, multimask_output=True,
                                   **{k: (v[0][i : i + 1], v[1][i : i + 1]) if k == "points" else v[i : i + 1]
                                      for k, v in prompts.items()})
                       for i in range(4) for image in (emb, prepared)]
            variants.append(tuple(torch.cat(t) for t in zip(*singles[0::2])))
            variants.append(tuple(torch.cat(t) for t in zip(*singles[1::2])))
        with torch.enable_grad():
            variants.append(ours.decode(emb, multimask_output=True, **prompts))
        for low, iou in variants:
            assert (low.detach() - shared[0]).abs().max() <= TOL, list(prompts)
            assert (iou.detach() - shared[1]).abs().max() <= TOL, list(prompts)
    assert torch.equal(emb, before)


def test_window_blocks_project_before_or_after_partitioning_alike(monkeypatch):
    """q, k, v projected before partitioning (CPU: real tokens only, the padding's set to the
    bias) or after it (GPU: the reference's order) give the same embedding, here with padding
    (20 tokens a side in 14-token windows, which go by parts), with and without autograd."""
    from segany.models import vit

    encoder = random_sam(config_with(SMALL_VIT, img_size=320, window_size=14), seed=6).image_encoder
    x = torch.randn(1, 3, 320, 320)
    outputs = []
    for before in (True, False):
        monkeypatch.setattr(vit, "_project_before_partition", lambda _x, before=before: before)
        with torch.no_grad():
            outputs.append(encoder(x))
        outputs.append(encoder(x).detach())
    for out in outputs[1:]:
        assert (out - outputs[0]).abs().max() <= 1e-4


def test_transformer_out_tokens_equal_the_full_output():
    """Tokens asked for by ``out_tokens`` (consecutive: a view; scattered: gathered) equal those
    rows of the full output; the image tokens are the same either way."""
    ours = random_sam(MODELS["sam_b"], seed=5)
    transformer = ours.mask_decoder.transformer
    emb, pe = torch.randn(1, 256, 64, 64), ours.prompt_encoder.get_dense_pe()
    tokens = torch.randn(3, 7, 256)
    with torch.no_grad():
        full, keys = transformer(emb, pe, tokens)
        for wanted in ([0, 1], [0, 2, 3, 4], [5]):
            part, part_keys = transformer(emb, pe, tokens, out_tokens=wanted)
            assert part.shape == (3, len(wanted), 256)
            assert (part - full[:, wanted]).abs().max() <= 1e-5 and torch.equal(part_keys, keys)


@pytest.mark.parametrize("onednn_fp32_rows", [sys.maxsize, 0])
def test_fused_linear_equals_plain_ops(onednn_fp32_rows, monkeypatch):
    """The oneDNN product with bias and activation fused, and MKL's with in-place passes (fp32 on
    CPUs without AVX-512), equal PyTorch's own ops (fp32; bf16 under autocast)."""
    from torch.nn import functional as F

    from segany.models import common
    from segany.models.common import linear

    monkeypatch.setattr(common, "ONEDNN_FP32_MAX_ROWS", onednn_fp32_rows)
    torch.manual_seed(0)
    x, w, b = torch.randn(2, 50, 96), torch.randn(64, 96) / 10, torch.randn(64)
    for activation in (None, "gelu", "relu"):
        plain = F.linear(x, w, b)
        plain = {None: plain, "gelu": F.gelu(plain), "relu": F.relu(plain)}[activation]
        with torch.no_grad():
            fused = linear(x, w, b, activation=activation)
            with torch.autocast("cpu", dtype=torch.bfloat16):
                fused_bf16 = linear(x, w, b, activation=activation)
        assert fused.shape == plain.shape and (fused - plain).abs().max() <= 1e-5
        assert fused_bf16.dtype == torch.bfloat16 and (fused_bf16.float() - plain).abs().max() <= 0.05
    # The residual added as the product is written: fp32, a bf16 stream under autocast, and an fp32
    # residual under autocast (PyTorch's promotion: an fp32 sum). The residual itself is left alone.
    residual = torch.randn(2, 50, 64)
    kept = residual.clone()
    plain = F.linear(x, w, b) + residual
    with torch.no_grad():
        fused = linear(x, w, b, residual=residual)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            fused_bf16 = linear(x, w, b, residual=residual.to(torch.bfloat16))
            mixed = linear(x, w, b, residual=residual)
        owned = residual.clone()  # given up by the caller: the plain product may accumulate onto it
        into_owned = linear(x, w, b, residual=owned, residual_owned=True)
    assert torch.equal(residual, kept)
    assert fused.shape == plain.shape and (fused - plain).abs().max() <= 1e-5
    assert into_owned.shape == plain.shape and (into_owned - plain).abs().max() <= 1e-5
    assert fused_bf16.dtype == torch.bfloat16 and (fused_bf16.float() - plain).abs().max() <= 0.05
    assert mixed.dtype == torch.float32 and (mixed - plain).abs().max() <= 0.05
    assert (linear(x, w, b, residual=residual) - plain).abs().max() <= 1e-5  # autograd on: plain ops


def test_half_encoder_keeps_a_bf16_residual_stream(monkeypatch):
    """Under CPU bf16 autocast (half=True) the ViT's blocks read and write bf16 (no casts around
    every product), and the embedding stays within the measured error of the fp32 one."""
    from segany.models import vit
    from segany.models.common import CPU_NATIVE_BF16

    model = random_sam(SMALL_VIT, seed=2).eval()
    image = torch.randn(1, 3, 256, 256)
    seen = []
    block_forward = vit.Block.forward

    def recording_forward(self, x, *args):  # on the class: a hook would turn the fused path off
        out = block_forward(self, x, *args)
        if self is model.image_encoder.blocks[1]:
            seen.append((x.dtype, out.dtype))
        return out

    monkeypatch.setattr(vit.Block, "forward", recording_forward)
    with torch.inference_mode():
        fp32 = model.image_encoder(image)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            half = model.image_encoder(image).float()
    # A CPU without bf16 units runs autocast's own ops (emulated bf16 products) on an fp32 stream.
    stream = torch.bfloat16 if CPU_NATIVE_BF16 else torch.float32
    assert seen == [(torch.float32, torch.float32), (stream, stream)]
    assert ((half - fp32).norm() / fp32.norm()).item() <= 0.03


def _rel_pos_attention_case(h: int, w: int):
    """A ViT attention with random relative positions on an ``h × w`` grid, q/k/v of 2 images ×
    4 heads, and the SDPA-with-bias result they should give."""
    from segany.models import vit

    torch.manual_seed(0)
    attn = vit.Attention(64, 4, use_rel_pos=True, input_size=(h, w))
    torch.nn.init.normal_(attn.rel_pos_h, std=0.2)
    torch.nn.init.normal_(attn.rel_pos_w, std=0.2)
    q, k, v = torch.randn(3, 2, 4, h * w, 16).unbind(0)
    ref = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=attn._rel_pos_bias(q, h, w),
                                                           scale=attn.scale)
    return attn, (q, k, v), ref


def test_chunked_global_attention_equals_sdpa(monkeypatch):
    """The CPU's chunked global attention gives the SDPA path's values, with and without autograd
    (chunks of 96 queries: four whole ones and a partial last one)."""
    from segany.models import vit

    monkeypatch.setattr(vit, "CPU_QUERY_CHUNK", 96)
    attn, (q, k, v), ref = _rel_pos_attention_case(20, 20)
    ref = ref.permute(0, 2, 1, 3).reshape(2, 20, 20, -1)  # token-major, as the chunks write it
    with torch.no_grad():
        chunked = attn._attention_in_parts(q, k, v, 20, 20)
    assert (chunked - ref).abs().max() <= 1e-5
    q.requires_grad_(True)
    with_grad = attn._attention_in_parts(q, k, v, 20, 20)  # autograd on: softmax out of place
    assert (with_grad - ref).abs().max() <= 1e-5
    with_grad.sum().backward()
    assert q.grad is not None and torch.isfinite(q.grad).all() and q.grad.abs().sum() > 0
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):  # half=True: bf16 q, k, v
        half = attn._attention_in_parts(*(t.detach().to(torch.bfloat16) for t in (q, k, v)), 20, 20)
    assert half.dtype == torch.bfloat16 and ((half.float() - ref).norm() / ref.norm()).item() <= 0.02


def test_half_precision_rel_pos_bias_equals_the_broadcast_sum():
    """On a CPU in bf16 the window bias is a product with one-hot keys: the same numbers as the
    broadcast sum of the two terms (non-square grid)."""
    attn, (q, _, _), _ = _rel_pos_attention_case(12, 20)
    with torch.autocast("cpu", dtype=torch.bfloat16):  # as half=True runs it
        q = q.to(torch.bfloat16)
        rel_h, rel_w = attn._rel_pos_terms(q, 12, 20)
        summed = (rel_h[..., :, None] + rel_w[..., None, :]).flatten(-2)
        bias = attn._rel_pos_bias(q, 12, 20)
    assert bias.dtype == torch.bfloat16 and torch.equal(bias, summed)


def test_augmented_rel_pos_attention_equals_bias():
    """The GPU's half-precision path (relative terms folded into q and k) computes the bias path's
    attention: checked here in fp32 on the CPU, on a non-square grid (rows and columns differ)."""
    from segany.models import vit

    attn, (q, k, v), ref = _rel_pos_attention_case(12, 20)
    out = attn._attention_augmented(q, k, v, 12, 20)
    assert out.shape == ref.shape
    assert (out - ref).abs().max() <= 1e-5
    # Taken only for half precision on a GPU, and only where flash takes the head dimension.
    assert not vit._gpu_half(q) and not vit._gpu_half(q.to(torch.bfloat16))  # CPU tensors
    assert vit._flash_takes(q, 12, 20) and not vit._flash_takes(torch.empty(1, 1, 1, 80), 64, 120)


@pytest.mark.parametrize("kind", ["sam_b", "sam2.1_t"])
def test_opencv_masks_equal_thresholded_postprocess(kind):
    """The CPU's OpenCV mask upscaling gives the model's own ``postprocess_masks`` thresholded:
    SAM's pad-crop-resize and SAM 2's stretch, images larger and smaller than the input frame,
    several masks; pixels may differ only where the logit is within float rounding of 0."""
    from segany.engine.transforms import masks_from_logits

    model = build_model(MODELS[kind])
    g = torch.Generator().manual_seed(0)
    low = torch.nn.functional.interpolate(torch.randn(2, 3, 64, 64, generator=g) * 4, (256, 256), mode="bilinear")
    for h, w in ((768, 1024), (600, 900), (1500, 1100), (97, 131)):
        inp = model.input_size(h, w)
        ref = model.postprocess_masks(low, inp, (h, w))
        got = masks_from_logits(low, model, inp, (h, w))
        assert got.dtype == torch.bool and got.shape == ref.shape == (2, 3, h, w)
        differ = got != (ref > model.mask_threshold)
        assert ref[differ].abs().max() <= 1e-4 if differ.any() else True, (h, w)
        assert differ.float().mean() <= 1e-5, (h, w)



def test_training_after_an_inference_mode_call():
    """A model that predicted under ``torch.inference_mode`` (a Predictor's call) can then be trained:
    ViT's cached index tables are made outside inference mode, so autograd may save them. Before,
    the backward pass raised "Inference tensors cannot be saved for backward"."""
    model = random_sam(SMALL_VIT)
    x = torch.randn(1, 3, 256, 256)
    with torch.inference_mode():
        before = model.encode_image(x)
    model.train()
    out = model.encode_image(x)
    out.square().mean().backward()
    grad = model.image_encoder.blocks[0].attn.rel_pos_h.grad
    assert grad is not None and grad.abs().sum() > 0
    assert (out.detach() - before).abs().max() <= 1e-4
