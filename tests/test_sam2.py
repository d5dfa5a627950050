"""SAM 2 / SAM 2.1: parity with Meta's ``sam2`` on identical random weights (fp32, CPU), parameter
counts, recognition of checkpoints from their tensors, and loading ``{"model": state_dict}`` files."""

from __future__ import annotations

import json
import warnings
from contextlib import contextmanager

import numpy as np
import pytest
import torch

from conftest import OutputRecorder, assert_same_outputs, randomize, test_image
from segany import SAM, Predictor
from segany.checkpoints import config_with, infer_config, load_model
from segany.errors import StateDictMismatchError
from segany.models import MODELS, build_model

sam2 = pytest.importorskip("sam2", reason="Meta's sam2 package (with hydra-core and iopath) is a test-only reference")
from sam2.build_sam import build_sam2  # noqa: E402
from sam2.sam2_image_predictor import SAM2ImagePredictor  # noqa: E402

TOL = 1e-4
REF_CONFIG = {"2": "configs/sam2/sam2_hiera_t.yaml", "2.1": "configs/sam2.1/sam2.1_hiera_t.yaml"}
# A small Hiera for fast tests: 256-pixel input, width 32, 2 heads, one block per stage but two at
# stride 16 (one of them global); memory parts and decoder at the official widths.
SMALL = dict(img_size=256, embed_dim=32, num_heads=2, stages=(1, 1, 2, 1), global_att_blocks=(3,))
SMALL_OVERRIDES = [
    "++model.image_size=256",
    "++model.image_encoder.trunk.embed_dim=32",
    "++model.image_encoder.trunk.num_heads=2",
    "++model.image_encoder.trunk.stages=[1,1,2,1]",
    "++model.image_encoder.trunk.global_att_blocks=[3]",
    "++model.image_encoder.neck.backbone_channel_list=[256,128,64,32]",
]
PARAMS = {"sam2_t": 38_945_986, "sam2_s": 46_043_842, "sam2_b": 80_833_666, "sam2_l": 224_430_130,
          "sam2.1_t": 38_962_498, "sam2.1_s": 46_060_354, "sam2.1_b": 80_850_178, "sam2.1_l": 224_446_642}


class Pair:
    """Our model and Meta's with the same random weights; records the decoder outputs of each call."""

    def __init__(self, version: str, small: bool, seed: int) -> None:
        self.config = MODELS[f"sam{version}_t"]
        if small:
            self.config = config_with(self.config, **SMALL)
        torch.manual_seed(seed)
        self.ours = randomize(build_model(self.config), seed)
        self.ref = build_sam2(REF_CONFIG[version], ckpt_path=None, device="cpu", mode="eval",
                              hydra_overrides_extra=SMALL_OVERRIDES if small else [])
        self.ref.load_state_dict(self.ours.state_dict(), strict=True)  # identical keys and shapes
        self.size = self.config.params["encoder"]["img_size"]
        self.calls: dict[str, list] = {"ours": [], "ref": []}
        decode_full, ref_decoder = self.ours.decode_full, self.ref.sam_mask_decoder.forward

        def ours_full(*a, **k):
            self.calls["ours"].append(out := decode_full(*a, **k))
            return out

        def ref_forward(*a, **k):
            self.calls["ref"].append(out := ref_decoder(*a, **k))
            return out

        self.ours.decode_full = ours_full  # Sam2.decode goes through decode_full
        self.ref.sam_mask_decoder.forward = ref_forward

    def predictors(self, img_bgr: np.ndarray) -> tuple[Predictor, SAM2ImagePredictor, dict]:
        """Both predictors with ``img_bgr`` set, and Meta's backbone output captured on the way."""
        captured, self.captured = {}, {}
        ref_pred = SAM2ImagePredictor(self.ref)
        s = self.size
        ref_pred._bb_feat_sizes = [(s // 4, s // 4), (s // 8, s // 8), (s // 16, s // 16)]  # hard-coded for 1024
        with _capture(self.ref.image_encoder, captured):
            ref_pred.set_image(np.ascontiguousarray(img_bgr[..., ::-1]))
        ours_pred = Predictor(model=self.ours, config=self.config)
        with _capture(self.ours.image_encoder, self.captured):
            ours_pred.set_image(img_bgr)
        return ours_pred, ref_pred, captured


@contextmanager
def _capture(encoder: torch.nn.Module, into: dict):
    """Record an image encoder's input and output dict (copying its lists: sam2 edits them in place)."""
    def hook(module, args, out):
        into.update({k: list(v) if isinstance(v, list) else v for k, v in out.items()}, input=args[0])

    handle = encoder.register_forward_hook(hook)
    try:
        yield
    finally:
        handle.remove()


def _diff(a: torch.Tensor, b: torch.Tensor) -> float:
    assert a.shape == b.shape, (a.shape, b.shape)
    return (a.float() - b.float()).abs().max().item()


def _prompt_cases(h: int, w: int, low_res: int):
    """(name, bboxes, points, labels, mask logits) in original pixels, as the user gives them."""
    box = [0.2 * w, 0.2 * h, 0.6 * w, 0.7 * h]
    boxes = [box, [0.5 * w, 0.1 * h, 0.9 * w, 0.5 * h], [0.05 * w, 0.55 * h, 0.45 * w, 0.95 * h]]
    pts = [[0.3 * w, 0.3 * h], [0.7 * w, 0.6 * h], [0.1 * w, 0.9 * h]]
    mask = torch.randn(1, low_res, low_res, generator=torch.Generator().manual_seed(0)) * 8
    return [
        ("one box", [box], None, None, None),
        ("several boxes", boxes, None, None, None),
        ("one point", None, [[pts[0]]], [[1]], None),
        ("two objects, one point each", None, [[pts[0]], [pts[1]]], [[1], [1]], None),
        ("several points per object", None, [pts], [[1, 1, 1]], None),
        ("negative point", None, [pts], [[1, 0, 1]], None),
        ("box and points", [box], [pts[:2]], [[1, 0]], None),
        ("mask input", None, [[pts[1]]], [[1]], mask),
    ]


def _check_prompts(pair: Pair, ours_pred: Predictor, ref_pred: SAM2ImagePredictor, h: int, w: int,
                   cases: dict[str, tuple[bool, ...]]) -> None:
    """Compare the prompt cases named in ``cases``, each with the multimask settings given."""
    low = pair.size // 4
    for name, boxes, pts, labels, mask in _prompt_cases(h, w, low):
        for multimask in cases.get(name, ()):
            pair.calls["ours"].clear()
            pair.calls["ref"].clear()
            res = ours_pred(bboxes=boxes, points=pts, labels=labels, masks=mask, multimask_output=multimask)[0]
            with torch.no_grad():
                args = ref_pred._prep_prompts(None if pts is None else np.array(pts), None if labels is None
                                              else np.array(labels), None if boxes is None else np.array(boxes),
                                              None if mask is None else mask.numpy(), True)
                ref_up, ref_iou, ref_low = ref_pred._predict(args[1], args[2], args[3], args[0], multimask,
                                                             return_logits=True)
            # Our Predictor lists each prompt's masks best first: order Meta's outputs the same way.
            order = torch.argsort(ref_iou, dim=1, descending=True)
            take = lambda t: torch.stack([t[i, order[i]] for i in range(len(t))]).flatten(0, 1)  # noqa: E731
            ref_up, ref_iou, ref_low = take(ref_up), take(ref_iou), take(ref_low)
            where = f"{name}, multimask={multimask}"
            assert _diff(res.boxes.conf, ref_iou) <= TOL, where
            assert _diff(res.low_res_logits, ref_low) <= TOL, where
            up = pair.ours.postprocess_masks(res.low_res_logits[:, None], (pair.size,) * 2, (h, w))[:, 0]
            assert _diff(up, ref_up) <= TOL, where
            differ = res.masks.data != (ref_up > 0)
            assert (ref_up[differ].abs() <= TOL).all(), f"{where}: masks differ away from the threshold"
            (ours_out,), (ref_out,) = pair.calls["ours"], pair.calls["ref"]
            assert _diff(ours_out.object_score_logits, ref_out[3]) <= TOL, where
            assert _diff(ours_out.sam_tokens, ref_out[2]) <= TOL, where


BOTH = (True, False)
ALL_CASES = {name: BOTH for name, *_ in _prompt_cases(1, 1, 1)}
# At full size (slow on CPU) each kind of prompt once; single-mask output (with sam2's stability
# fallback) and multimask output both appear.
FULL_SIZE_CASES = {"one box": (False,), "several boxes": (True,), "one point": BOTH, "negative point": (False,),
                   "box and points": (True,), "mask input": (True,)}


@pytest.fixture(scope="module")
def tiny_pair() -> Pair:
    return Pair("2.1", small=False, seed=3)


def test_tiny_full_size_features_and_prompts(tiny_pair):
    """SAM 2.1 Hiera-T at 1024: inputs, every backbone level, and all prompt kinds."""
    pair = tiny_pair
    h, w = 480, 640
    img = test_image(h, w, seed=2)
    ours_pred, ref_pred, ref_backbone = pair.predictors(img)
    ours_backbone = pair.captured
    assert ours_backbone["input"].shape == (1, 3, 1024, 1024)
    assert _diff(ours_backbone["input"], ref_backbone["input"]) <= 1e-5, "input differs from sam2's transforms"
    for level in range(3):
        ours_level = ours_backbone["backbone_fpn"][level]
        assert _diff(ours_level, ref_backbone["backbone_fpn"][level]) <= TOL, level
        pos = pair.ours.image_encoder.neck.position_encoding(ours_level)  # not computed for single images
        assert _diff(pos, ref_backbone["vision_pos_enc"][level]) <= TOL, level
    feats = ours_pred.image.features
    assert feats["image_embed"].shape == (1, 256, 64, 64)
    assert _diff(feats["image_embed"], ref_pred._features["image_embed"]) <= TOL
    for i in range(2):
        assert _diff(feats[f"high_res_feats_{i}"], ref_pred._features["high_res_feats"][i]) <= TOL
    _check_prompts(pair, ours_pred, ref_pred, h, w, FULL_SIZE_CASES)


def test_sharp_logits_are_clamped_and_refine_as_sam2():
    """With logits past ±32 (as a trained model's, made here by a larger mask-head output layer in
    both models), the results' low_res_logits are clamped as sam2's predictor returns them, masks
    come from the unclamped ones, and feeding them back (the README's refinement) goes as in sam2.
    Logits are compared within 30 × TOL: they are 30 times larger."""
    pair = Pair("2.1", small=True, seed=5)
    with torch.no_grad():
        for m in (pair.ours, pair.ref):
            for k, v in m.state_dict().items():
                if "output_hypernetworks_mlps" in k and "layers.2" in k:
                    v.mul_(30)
    h, w = 180, 240
    ours_pred, ref_pred, _ = pair.predictors(test_image(h, w, seed=4))
    box = np.array([20, 30, 200, 160], float)
    with torch.no_grad():
        ref_up, ref_iou, ref_low = ref_pred.predict(box=box, multimask_output=False, return_logits=True)
    res = ours_pred(bboxes=box, multimask_output=False)[0]
    assert np.abs(ref_low).max() == 32, "the case needs logits past ±32"
    assert _diff(res.low_res_logits, torch.from_numpy(ref_low)) <= 30 * TOL
    assert np.array_equal(res.masks.data.numpy(), ref_up > 0)
    with torch.no_grad():
        ref_up, ref_iou, ref_low = ref_pred.predict(box=box, mask_input=ref_low, multimask_output=False,
                                                    return_logits=True)
    res = ours_pred(bboxes=box, masks=res.low_res_logits, multimask_output=False)[0]
    assert _diff(res.boxes.conf, torch.from_numpy(ref_iou)) <= TOL
    assert _diff(res.low_res_logits, torch.from_numpy(ref_low)) <= 30 * TOL
    differ = res.masks.data.numpy() != (ref_up > 0)
    assert (np.abs(ref_up[differ]) <= 30 * TOL).all()


@pytest.fixture(scope="module", params=["2", "2.1"])
def small_pair(request) -> Pair:
    return Pair(request.param, small=True, seed=5)


def test_small_config_parity(small_pair):
    """Every prompt kind on a small model; a wide image for SAM 2, a tall one (downscaled) for 2.1."""
    pair = small_pair
    shape = (180, 240) if pair.config.params["version"] == "2" else (300, 97)
    x = torch.randn(2, 3, 256, 256)
    with torch.no_grad():
        ours, ref = pair.ours.forward_image(x), pair.ref.forward_image(x)
    for level in range(3):
        assert _diff(ours["backbone_fpn"][level], ref["backbone_fpn"][level]) <= TOL
        assert _diff(ours["vision_pos_enc"][level], ref["vision_pos_enc"][level]) <= TOL
    img = test_image(*shape, seed=4)
    ours_pred, ref_pred, _ = pair.predictors(img)
    _check_prompts(pair, ours_pred, ref_pred, *shape, ALL_CASES)  # mask prompts: 64×64 logits here


def test_cpu_inference_paths_and_cached_position_embedding(monkeypatch):
    """Without autograd, windowed blocks go by bands of rows and MLPs by chunks of tokens (parts
    left over here), the 1×1 convs are products on channels-last data and the trunk's position
    embedding is reused: the reference's values, also after the tables change in place (in a
    model made in inference mode too); with autograd, the plain ops give the same."""
    from segany.models import common, hiera

    pair = Pair("2.1", small=True, seed=6)
    monkeypatch.setattr(common, "CPU_MLP_ROWS", 1000)  # the first stage's 64×64 tokens: 4 chunks and 96 left
    monkeypatch.setattr(hiera, "CPU_BAND_TOKENS", 1536)  # windowed blocks on 64×64: bands of 24, 24 and 16 rows
    bands = []
    forward = hiera.MultiScaleBlock._forward
    monkeypatch.setattr(hiera.MultiScaleBlock, "_forward", lambda self, t, s: bands.append(t.shape[1]) or forward(self, t, s))
    x = torch.randn(2, 3, 256, 256)

    def check(ours_fpn):
        with torch.no_grad():
            ref = pair.ref.forward_image(x)["backbone_fpn"]
        for level in range(3):
            assert _diff(ours_fpn[level], ref[level]) <= TOL

    with torch.no_grad():
        check(pair.ours.forward_image(x)["backbone_fpn"])
        assert bands[:6] == [24, 24, 16, 24, 24, 16]  # the first stage's block and the pooling one
        for model in (pair.ours, pair.ref):  # as a training step or a load_state_dict would
            model.image_encoder.trunk.pos_embed.add_(0.5)
        check(pair.ours.forward_image(x)["backbone_fpn"])
    with torch.inference_mode():  # a model made in inference mode: its tables have no version counter
        made_here = build_model(pair.config).eval()
        made_here.load_state_dict(pair.ours.state_dict())
        check(made_here.forward_image(x)["backbone_fpn"])
        for model in (made_here, pair.ref):
            model.image_encoder.trunk.pos_embed_window.sub_(0.25)
        check(made_here.forward_image(x)["backbone_fpn"])
    pair.ours.image_encoder.trunk.pos_embed_window.data.sub_(0.25)
    grad_fpn = pair.ours.forward_image(x.requires_grad_())["backbone_fpn"]
    check(grad_fpn)
    grad_fpn[0].sum().backward()
    assert pair.ours.image_encoder.trunk.pos_embed.grad is not None and torch.isfinite(x.grad).all()


@pytest.mark.parametrize("hooked", ["all", "few"])
def test_hooks_see_the_reference_outputs(monkeypatch, hooked):
    """Hooks on every module of the trunk and neck, or on a few while the rest goes by bands and
    chunks: each sees what it sees in sam2, and no later block writes into what it kept."""
    from segany.models import common, hiera

    pair = Pair("2.1", small=True, seed=7)
    monkeypatch.setattr(common, "CPU_MLP_ROWS", 1000)
    monkeypatch.setattr(hiera, "CPU_BAND_TOKENS", 1536)
    names = None if hooked == "all" else {"trunk.blocks.0", "trunk.blocks.1.mlp.layers.0", "trunk.blocks.2.attn",
                                          "neck.convs.3.conv"}
    x = torch.randn(1, 3, 256, 256)
    ours, ref = pair.ours.image_encoder, pair.ref.image_encoder
    with torch.no_grad(), OutputRecorder(ours, names) as got, OutputRecorder(ref, names) as want:
        out, expected = ours(x), ref(x)
    for level in range(3):
        assert _diff(out["backbone_fpn"][level], expected["backbone_fpn"][level]) <= TOL
    assert assert_same_outputs(got, want, TOL) == want.tensors(got.outputs)
    assert hooked == "all" or want.tensors() == len(names)
    if hooked == "all":  # and the decoder's, through both predictors
        ours_pred, ref_pred, _ = pair.predictors(test_image(180, 240, seed=2))
        box = np.array([[40.0, 30, 150, 160]])
        with OutputRecorder(pair.ours.sam_mask_decoder) as got, OutputRecorder(pair.ref.sam_mask_decoder) as want:
            ours_pred(bboxes=box, multimask_output=False)
            with torch.no_grad():
                _, points, labels, boxes = ref_pred._prep_prompts(None, None, box, None, True)
                ref_pred._predict(points, labels, boxes, None, False)
        # every module both have (sam2's MLPs also have ReLU modules, ours functions) but the
        # decoder itself, which gives more than sam2's
        del got.outputs[""]
        assert assert_same_outputs(got, want, TOL) == want.tensors(got.outputs)


@pytest.mark.parametrize("change", ["an MLP replaced", "a lateral conv extended", "a block's one input unpacked"])
def test_replaced_modules_act_as_in_the_reference(change):
    """A block's MLP replaced by an identity, a ReLU appended to a neck lateral, a pre-hook that
    takes a block's one input: both models changed alike give the same features."""
    pair = Pair("2.1", small=True, seed=8)
    x = torch.randn(1, 3, 256, 256)
    with torch.no_grad():
        plain = pair.ours.forward_image(x)["backbone_fpn"]
        for model in (pair.ours, pair.ref):
            encoder = model.image_encoder
            if change == "an MLP replaced":
                encoder.trunk.blocks[0].mlp = torch.nn.Identity()
            elif change == "a lateral conv extended":
                encoder.neck.convs[0].add_module("relu", torch.nn.ReLU())
            else:  # (x,) = args, the usual idiom: a block takes one tensor, as in sam2
                encoder.trunk.blocks[3].register_forward_pre_hook(lambda _m, args: (args[0] * 1.5,) if len(args) == 1
                                                                  else pytest.fail(f"{len(args)} inputs"))
        ours, ref = pair.ours.forward_image(x)["backbone_fpn"], pair.ref.forward_image(x)["backbone_fpn"]
    for level in range(3):
        assert _diff(ours[level], ref[level]) <= TOL
    assert max(_diff(a, b) for a, b in zip(ours, plain)) > 1e-2


def test_mlp_by_chunks_keeps_the_dtype_of_the_whole_product(monkeypatch):
    """The MLP gives the dtype autocast would give the whole map, chunked or not."""
    from segany.models import common
    from segany.models.hiera import GeluMLP

    monkeypatch.setattr(common, "CPU_MLP_ROWS", 100)
    mlp = GeluMLP(16, 64)
    for rows in (100, 101):
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
            assert mlp(torch.randn(rows, 16)).dtype == torch.bfloat16
        x = torch.randn(rows, 16, dtype=torch.bfloat16)
        with torch.no_grad():  # bf16 tokens, fp32 shortcut: the sum is fp32, as PyTorch's add makes it
            y = common.mlp_in_chunks(x, *mlp.to(torch.bfloat16).layers, residual=x.float())
        mlp.float()
        assert y.dtype == torch.float32


def test_bf16_autocast_on_the_cpu_is_close_to_fp32():
    """Under CPU bf16 autocast (``half=True`` on a CPU with bf16 units) Hiera's stream turns bf16
    after the first widening block; its products then take autocast's path, not the scratch's fp32 one."""
    config = config_with(MODELS["sam2.1_t"], **SMALL)
    torch.manual_seed(0)
    model = randomize(build_model(config), 0).eval()
    x = torch.randn(1, 3, 256, 256)
    with torch.inference_mode():
        fp32 = model.forward_image(x)["backbone_fpn"]
        with torch.autocast("cpu", dtype=torch.bfloat16):
            half = model.forward_image(x)["backbone_fpn"]
    for a, b in zip(fp32, half):
        assert ((b.float() - a).norm() / a.norm()).item() <= 0.03


def test_small_config_mask_prompts_and_batched_images(small_pair):
    """Mask prompts straight through ``decode`` (features of one image shared by the prompts),
    and the features of a batch of images equal those of each image alone."""
    pair = small_pair
    x = torch.randn(3, 3, 256, 256)
    masks = torch.randn(2, 1, 64, 64) * 8
    pts, labels = torch.tensor([[[40.0, 60.0]], [[200.0, 100.0]]]), torch.tensor([[1], [0]], dtype=torch.int32)
    with torch.no_grad():
        batched = pair.ours.encode_image(x)
        single = pair.ours.encode_image(x[1:2])
        for k in single:
            assert _diff(batched[k][1:2], single[k]) <= TOL, k
        for multimask in (True, False):
            low, iou = pair.ours.decode(single, points=(pts, labels), mask_inputs=masks, multimask_output=multimask)
            sparse, dense = pair.ref.sam_prompt_encoder(points=(pts, labels), boxes=None, masks=masks)
            high_res = [single["high_res_feats_0"], single["high_res_feats_1"]]
            ref_low, ref_iou, _, ref_obj = pair.ref.sam_mask_decoder(
                single["image_embed"], pair.ref.sam_prompt_encoder.get_dense_pe(), sparse, dense, multimask,
                repeat_image=True, high_res_features=high_res)
            assert _diff(low, ref_low) <= TOL and _diff(iou, ref_iou) <= TOL
            assert _diff(pair.calls["ours"][-1].object_score_logits, ref_obj) <= TOL


def test_single_mask_stability_fallback(small_pair):
    """With one mask asked for, unstable single masks are replaced by the best multimask output.
    Random weights give unstable masks only, so the threshold is set between the prompts' scores."""
    pair = small_pair
    ours_dec, ref_dec = pair.ours.sam_mask_decoder, pair.ref.sam_mask_decoder
    pts = torch.rand(8, 1, 2, generator=torch.Generator().manual_seed(2)) * 256
    labels = torch.ones(8, 1, dtype=torch.int32)
    with torch.no_grad():
        feats = pair.ours.encode_image(torch.randn(1, 3, 256, 256))
        sparse, dense = pair.ours.sam_prompt_encoder(points=(pts, labels), boxes=None, masks=None)
        pe, high_res = pair.ours.sam_prompt_encoder.get_dense_pe(), [feats["high_res_feats_0"], feats["high_res_feats_1"]]
        all_masks = ours_dec.predict_masks(feats["image_embed"], pe, sparse, dense, high_res)[0]
        stability = ours_dec._stability_scores(all_masks[:, :1]).flatten()
        old = ours_dec.dynamic_multimask_stability_thresh
        try:
            for dec in (ours_dec, ref_dec):
                dec.dynamic_multimask_stability_thresh = stability.median().item()
            low, iou = pair.ours.decode(feats, points=(pts, labels), multimask_output=False)
            ref_low, ref_iou, _, _ = ref_dec(feats["image_embed"], pe, sparse, dense, False, repeat_image=True,
                                             high_res_features=high_res)
        finally:
            for dec in (ours_dec, ref_dec):
                dec.dynamic_multimask_stability_thresh = old
    stable = stability >= stability.median()
    assert 0 < stable.sum() < len(stable)
    assert torch.equal(low[stable], all_masks[stable, :1]) and not torch.equal(low[~stable], all_masks[~stable, :1])
    assert _diff(low, ref_low) <= TOL and _diff(iou, ref_iou) <= TOL


def test_memory_modules_parity(small_pair):
    """The video parts kept in the model compute what Meta's do (memory attention with object
    pointers excluded from RoPE, and the memory encoder)."""
    pair = small_pair
    g = torch.Generator().manual_seed(1)
    n, b = 16 * 16, 2
    curr, curr_pos = torch.randn(n, b, 256, generator=g), torch.randn(n, b, 256, generator=g)
    memory, memory_pos = torch.randn(2 * n + 4, b, 64, generator=g), torch.randn(2 * n + 4, b, 64, generator=g)
    pix, mask = torch.randn(b, 256, 16, 16, generator=g), torch.randn(b, 1, 256, 256, generator=g) * 5
    with torch.no_grad():
        ours = pair.ours.memory_attention(curr, memory, curr_pos, memory_pos, num_obj_ptr_tokens=4)
        ref = pair.ref.memory_attention(curr, memory, curr_pos, memory_pos, num_obj_ptr_tokens=4)
        assert _diff(ours, ref) <= TOL
        ours, ref = pair.ours.memory_encoder(pix, mask), pair.ref.memory_encoder(pix, mask)
    assert _diff(ours["vision_features"], ref["vision_features"]) <= TOL
    assert _diff(ours["vision_pos_enc"][0], ref["vision_pos_enc"][0]) <= TOL


@pytest.mark.parametrize("name", list(PARAMS))
def test_parameter_counts_and_recognition(name):
    with torch.device("meta"):
        model = build_model(name)
    assert sum(p.numel() for p in model.parameters()) == PARAMS[name]
    assert infer_config(model.state_dict()).name == name
    assert MODELS[name].family == "sam2" and f"{name}.pt" in MODELS[name].aliases


def test_state_dict_keys_equal_the_reference_for_sam2_0():
    """SAM 2.0 lacks 2.1's two extra tensors; every other key and shape is the reference's."""
    with torch.device("meta"):
        ours = build_model("sam2_t").state_dict()
    ref = build_sam2(REF_CONFIG["2"], ckpt_path=None, device="cpu").state_dict()
    assert {k: v.shape for k, v in ours.items()} == {k: v.shape for k, v in ref.items()}
    assert "no_obj_embed_spatial" not in ours and "obj_ptr_tpos_proj.weight" not in ours


def _same_weights(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def test_meta_style_file_loads_through_sam_and_load_model(tmp_path):
    cfg = config_with(MODELS["sam2.1_t"], **{**SMALL, "num_heads": 1})
    model = randomize(build_model(cfg), seed=7)
    path = tmp_path / "my_sam2.pt"
    torch.save({"model": model.state_dict()}, path)
    loaded, found = load_model(path)
    assert _same_weights(loaded, model)
    enc = found.params["encoder"]
    assert found.family == "sam2" and found.params["version"] == "2.1" and found.name == "my_sam2"
    assert (enc["embed_dim"], enc["stages"], enc["num_heads"], enc["global_att_blocks"]) == (32, (1, 1, 2, 1), 1, (3,))
    api = SAM(str(path))
    assert _same_weights(api.model, model) and api.config.family == "sam2"
    # The image size is not in the tensors: a custom file works at the official 1024.
    assert api.model.img_size == 1024 and api.model.input_size(120, 160) == (1024, 1024)


def test_renamed_official_files_load_as_what_they_are(tmp_path, tiny_pair):
    """A SAM 2.1 file named as SAM 2 (and the reverse) loads as its tensors say, with a warning."""
    cases = [(tiny_pair.ours, "sam2_t.pt", "sam2.1_t"), (build_model("sam2_t"), "sam2.1_hiera_tiny.pt", "sam2_t")]
    for model, filename, real in cases:
        path = tmp_path / filename
        torch.save({"model": model.state_dict()}, path)
        with pytest.warns(UserWarning, match=f"tensors are SAM {MODELS[real].params['version']}: {real}"):
            loaded, cfg = load_model(path, name=path.stem)
        assert cfg.name == real and _same_weights(loaded, model)
        if real == "sam2_t":  # through SAM(), info() says the real model
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                api = SAM(str(path))
            assert api.config.name == "sam2_t" and api.info(verbose=False)["name"] == "sam2_t"
        path.unlink()


def test_incomplete_sam2_file_gets_a_clear_message(tmp_path):
    path = tmp_path / "partial.pt"
    torch.save({"model": {"image_encoder.trunk.patch_embed.proj.weight": torch.zeros(96, 3, 7, 7)}}, path)
    with pytest.raises(StateDictMismatchError, match="SAM 2.*lacks the tensor"):
        load_model(path)


def test_val_from_the_command_line_takes_a_sam2_checkpoint(tmp_path, capsys):
    from segany.cli import main

    cfg = config_with(MODELS["sam2.1_t"], **{**SMALL, "num_heads": 1})
    path = tmp_path / "my_sam2.pt"
    torch.save({"model": randomize(build_model(cfg), seed=3).state_dict()}, path)
    out = tmp_path / "v.json"
    assert main(["val", f"model={path}", "data=synthetic:2", "max_images=1", "kinds=box",
                 f"save_json={out}", "verbose=False"]) == 0
    res = json.loads(out.read_text())
    assert res["images"] == 1 and res["instances"] >= 1 and 0 <= res["box"] <= 1
    assert main(["train", f"model={path}", "data=synthetic:2", "epochs=1"]) == 2  # training: not SAM 2
    assert "SAM 2 is not supported" in capsys.readouterr().err
