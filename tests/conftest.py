"""Shared test fixtures: random-weight SAM models saved as real checkpoint files, and Meta's
reference model built with the same architecture and weights."""

from __future__ import annotations

import warnings
from functools import partial

import cv2
import numpy as np
import pytest
import torch

from segany.checkpoints import config_with
from segany.models import MODELS, ModelConfig, build_model

# A ViT SAM small enough for fast tests: 256-pixel input, 4 blocks, 2 global.
SMALL_VIT = config_with(
    MODELS["sam_b"], img_size=256, embed_dim=64, depth=4, num_heads=4, global_attn_indexes=(1, 3), window_size=7
)


def randomize(model: torch.nn.Module, seed: int = 0, std: float = 0.05) -> torch.nn.Module:
    """Perturb every parameter and buffer with seeded noise, so zero-initialised tensors
    (relative positions, biases) take part in parity checks."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        # Only what a checkpoint holds: non-persistent buffers (pixel mean/std) stay as they are.
        for t in model.state_dict().values():
            if t.is_floating_point():
                t.add_(torch.randn(t.shape, generator=g) * std)
    return model


def random_sam(config: ModelConfig = SMALL_VIT, seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return randomize(build_model(config), seed)


def meta_sam(config: ModelConfig, package: str = "segment_anything"):
    """Meta's ``Sam`` with the architecture of a segany ``sam_vit`` config (random weights), or with
    ``package="ultralytics"`` Ultralytics' port of it (``SAMModel``, the same state-dict keys)."""
    if package == "ultralytics":
        from ultralytics.models.sam.modules.decoders import MaskDecoder
        from ultralytics.models.sam.modules.encoders import ImageEncoderViT, PromptEncoder
        from ultralytics.models.sam.modules.sam import SAMModel as Sam
        from ultralytics.models.sam.modules.transformer import TwoWayTransformer
    else:
        from segment_anything.modeling import ImageEncoderViT, MaskDecoder, PromptEncoder, Sam, TwoWayTransformer

    p, e = config.params, config.params["encoder"]
    grid = e["img_size"] // e["patch_size"]
    return Sam(
        image_encoder=ImageEncoderViT(
            depth=e["depth"], embed_dim=e["embed_dim"], img_size=e["img_size"], mlp_ratio=e["mlp_ratio"],
            norm_layer=partial(torch.nn.LayerNorm, eps=1e-6), num_heads=e["num_heads"],
            patch_size=e["patch_size"], qkv_bias=True, use_rel_pos=True,
            global_attn_indexes=e["global_attn_indexes"], window_size=e["window_size"],
            out_chans=p["prompt_embed_dim"],
        ),
        prompt_encoder=PromptEncoder(
            embed_dim=p["prompt_embed_dim"], image_embedding_size=(grid, grid),
            input_image_size=(e["img_size"], e["img_size"]), mask_in_chans=p["mask_in_chans"],
        ),
        mask_decoder=MaskDecoder(
            num_multimask_outputs=p["num_multimask_outputs"],
            transformer=TwoWayTransformer(depth=p["decoder_depth"], embedding_dim=p["prompt_embed_dim"],
                                          mlp_dim=p["decoder_mlp_dim"], num_heads=p["decoder_heads"]),
            transformer_dim=p["prompt_embed_dim"], iou_head_depth=p["iou_head_depth"],
            iou_head_hidden_dim=p["iou_head_hidden_dim"],
        ),
    ).eval()


def meta_twin(model: torch.nn.Module, config: ModelConfig, package: str = "segment_anything"):
    """Meta's model (or Ultralytics', see :func:`meta_sam`) carrying exactly the weights of ``model``."""
    ref = meta_sam(config, package)
    ref.load_state_dict(model.state_dict(), strict=True)
    return ref


def test_image(h: int = 180, w: int = 240, seed: int = 0) -> np.ndarray:
    """A BGR uint8 image with shapes and noise (something for masks to find)."""
    rng = np.random.default_rng(seed)
    img = rng.integers(0, 60, (h, w, 3), dtype=np.uint8)
    img[h // 4 : h // 2, w // 4 : w // 2] = (30, 200, 240)
    yy, xx = np.mgrid[:h, :w]
    img[(yy - 0.65 * h) ** 2 + (xx - 0.7 * w) ** 2 < (0.15 * min(h, w)) ** 2] = (220, 60, 40)
    return img


test_image.__test__ = False  # a helper, not a test


@pytest.fixture(scope="session")
def small_ckpt(tmp_path_factory) -> str:
    """A small random-weight SAM saved as a Meta-style plain state dict."""
    path = tmp_path_factory.mktemp("ckpt") / "small_sam.pth"
    torch.save(random_sam(SMALL_VIT, seed=1).state_dict(), path)
    return str(path)


@pytest.fixture()
def img_path(tmp_path) -> str:
    """A 180×240 test image written as a PNG file."""
    path = tmp_path / "scene.png"
    cv2.imwrite(str(path), test_image())
    return str(path)


@pytest.fixture()
def model(small_ckpt):
    """``SAM`` over the small random checkpoint."""
    from segany import SAM

    return SAM(small_ckpt)


@pytest.fixture(autouse=True)
def _isolated_weights_dir(tmp_path, monkeypatch):
    """Never touch the user's weights cache from a test."""
    monkeypatch.setenv("SEGANY_WEIGHTS_DIR", str(tmp_path / "weights-cache"))


def quiet_import_mobile_sam():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        import mobile_sam  # noqa: F401
    return mobile_sam


def smooth_weights(model: torch.nn.Module, gain: float = 50.0) -> torch.nn.Module:
    """Make random-weight masks smooth, local blobs like a trained model's (random weights
    otherwise give salt-and-pepper masks whose boxes all cover the image): no absolute/relative
    position terms in the encoder, position-independent output upscaling, sharper logits."""
    with torch.no_grad():
        for k, v in model.state_dict().items():
            if k.endswith("pos_embed") or "rel_pos" in k:
                v.zero_()
            if k.startswith("mask_decoder.output_upscaling") and k.endswith("weight") and v.ndim == 4:
                v.copy_(v.mean((2, 3), keepdim=True).expand_as(v))
            if "output_hypernetworks_mlps" in k and "layers.2" in k:
                v.mul_(gain)
    return model


@pytest.fixture
def one_thread():
    """One torch thread for the test: bit-identical runs, and much faster on a busy shared machine."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


class OutputRecorder:
    """Forward hooks that keep every output of the named modules of a model (all by default) as it
    is, without a copy, so that a later in-place write into an output shows; ``copy``: as it was
    when made (for a reference that writes into outputs itself, as MobileSAM's ``x += shortcut``).
    A context manager: the hooks go with it."""

    def __init__(self, model: torch.nn.Module, names: set[str] | None = None, copy: bool = False) -> None:
        self.outputs: dict[str, list[list[torch.Tensor]]] = {}  # name → the tensors of each call's output
        self._handles = []

        def keep(name, out):
            tensors = output_tensors(out)
            self.outputs[name].append([t.clone() for t in tensors] if copy else tensors)

        for name, module in model.named_modules():
            if names is None or name in names:
                self.outputs[name] = []
                self._handles.append(module.register_forward_hook(lambda _m, _a, out, name=name: keep(name, out)))

    def tensors(self, names=None) -> int:
        """How many output tensors were kept (of the modules ``names`` only, if given)."""
        return sum(len(call) for name, calls in self.outputs.items() if names is None or name in names
                   for call in calls)

    def __enter__(self) -> OutputRecorder:
        return self

    def __exit__(self, *exc) -> None:
        for handle in self._handles:
            handle.remove()


def output_tensors(out) -> list[torch.Tensor]:
    """The tensors of a module's output: itself, or those in its tuples, lists and dicts, in order."""
    if isinstance(out, torch.Tensor):
        return [out]
    if isinstance(out, dict):
        out = list(out.values())
    if isinstance(out, (list, tuple)):
        return [t for o in out for t in output_tensors(o)]
    return []


def assert_same_outputs(ours: OutputRecorder, ref: OutputRecorder, tol: float = 1e-4) -> int:
    """Every module both recorded ran as many times in each, with outputs of as many tensors, each
    equal to the reference's: as it is, as ``(B, H, W, C)`` tokens against ``(B, H*W, C)``, or as a
    ``(B, C, H, W)`` map against ``(B, H*W, C)`` tokens (MobileSAM's layouts). Returns how many
    tensors were compared; a pair of no known layout fails."""
    compared = 0
    for name in ours.outputs.keys() & ref.outputs.keys():
        a, b = ours.outputs[name], ref.outputs[name]
        assert len(a) == len(b), f"{name}: called {len(a)} times, the reference {len(b)}"
        for x, y in zip(a, b):
            assert len(x) == len(y), f"{name}: {len(x)} output tensors, the reference {len(y)}"
            for t, r in zip(x, y):
                if t.shape != r.shape and t.numel() == r.numel():
                    if t.shape[-1:] == r.shape[-1:]:
                        t = t.reshape(r.shape)
                    elif t.ndim == 4 and r.ndim == 3:
                        t = t.flatten(2).transpose(1, 2)
                assert t.shape == r.shape, f"{name}: output shaped {tuple(t.shape)}, the reference {tuple(r.shape)}"
                assert (t - r).abs().max().item() <= tol, f"{name}: output differs by {(t - r).abs().max()}"
                compared += 1
    return compared
