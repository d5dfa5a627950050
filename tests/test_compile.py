"""``torch.compile`` traces each image encoder as one graph (issue 10). A graph break splits the
encoder into frames per block, and past the compiler's recompile limit those blocks run eagerly.
torch 2.11's compiler broke at every MLP on a bool index in ``common.activate`` (ViT-H's compiled
``half=True`` path: 21.5 ms an image on an H200); the torch here traced it, so these tests catch
the breaks this torch sees, on the CPU path and on the GPU's half-precision path alike."""

from __future__ import annotations

import pytest
import torch
from conftest import SMALL_VIT, random_sam

from segany.checkpoints import config_with
from segany.models import MODELS, build_model, vit


def graph_breaks(encoder: torch.nn.Module, x: torch.Tensor, autocast: bool = False) -> int:
    torch._dynamo.reset()
    with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        return torch._dynamo.explain(encoder)(x).graph_break_count


@pytest.mark.parametrize("gpu_path", [False, True], ids=["cpu-path", "gpu-half-path"])
def test_vit_encoder_traces_as_one_graph(monkeypatch, gpu_path):
    if gpu_path:  # the GPU's half-precision attention (relative terms inside q and k), traced here
        monkeypatch.setattr(vit, "_gpu_half", lambda q: True)
    encoder = random_sam(SMALL_VIT).image_encoder.eval()
    assert graph_breaks(encoder, torch.randn(1, 3, 256, 256), autocast=gpu_path) == 0


@pytest.mark.parametrize("name", ["mobile_sam", "sam2.1_t"])
def test_other_encoders_trace_as_one_graph(name):
    config = MODELS[name]
    if name.startswith("sam2"):
        config = config_with(config, img_size=256, embed_dim=32, num_heads=2, stages=(1, 1, 2, 1),
                             global_att_blocks=(3,))
    model = build_model(config).eval()
    size = 256 if name.startswith("sam2") else 1024
    assert graph_breaks(model.image_encoder, torch.randn(1, 3, size, size)) == 0


def test_compiled_decode_of_a_prepared_image_equals_eager():
    """The decoder's fused path under torch.compile (aot_eager: the graph as the compiler makes it,
    run by eager kernels), with a prepared image: the same logits as eager. (An ``out=`` division
    kept the input's strides when compiled, and the view after it failed.)"""
    model = random_sam(SMALL_VIT).eval()
    torch._dynamo.reset()
    boxes = torch.tensor([[10.0, 20, 150, 200], [60, 40, 230, 120]])
    with torch.inference_mode():
        prepared = model.prepare_image(torch.randn(1, 256, 16, 16))
        low, iou = model.decode(prepared, boxes=boxes)
        low_c, iou_c = torch.compile(model.decode, backend="aot_eager")(prepared, boxes=boxes)
    assert (low_c - low).abs().max() <= 1e-4 and (iou_c - iou).abs().max() <= 1e-4
