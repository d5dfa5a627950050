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
