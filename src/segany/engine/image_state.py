"""An encoded image (:class:`ImageState`) and its file form (``Predictor.save_embedding`` /
``load_embedding``): tensors only, so a file is read with ``torch.load(weights_only=True)``."""

from __future__ import annotations

import dataclasses
import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from ..errors import ImageNotFoundError, SegAnyError, short_reason
from ..models.sam2 import Sam2
from .export import atomic_torch_save

Features = "torch.Tensor | dict[str, torch.Tensor]"


@dataclass
class ImageState:
    """An encoded image: what prompts need to become masks."""

    orig_img: np.ndarray  # (H, W, 3) uint8 BGR
    path: str
    original_size: tuple[int, int]  # (H, W)
    input_size: tuple[int, int]  # (h', w') after resizing the longest side to the model's size
    features: Features  # (1, C, h, w) image embedding; a dict of such tensors for models with several levels
    encode_ms: float = 0.0
    preprocess_ms: float = 0.0
    decoder_input: Any = None  # features with their prompt-independent decoder work done (Predictor.decoder_input)

    def for_decoder(self) -> Any:
        """What to give the model's ``decode``: the prepared features, else the features."""
        return self.features if self.decoder_input is None else self.decoder_input

    def with_features_on(self, device: torch.device) -> ImageState:
        """A copy whose features are on ``device`` (without ``decoder_input``, which is made from them)."""
        feats = self.features
        feats = {k: v.to(device) for k, v in feats.items()} if isinstance(feats, dict) else feats.to(device)
        return dataclasses.replace(self, features=feats, decoder_input=None)


def feature_slice(feats: Features, i: int) -> Features:
    """Image ``i`` of a batch of features (a tensor, or a dict of tensors), in fp32."""
    if isinstance(feats, dict):
        return {k: v[i : i + 1].float() for k, v in feats.items()}
    return feats[i : i + 1].float()


def encoder_fingerprint(model: nn.Module) -> str:
    """A short digest of the image encoder's weights (names, shapes, and the first values of each
    tensor, rounded to bf16): an embedding is valid for models whose encoders share it, whatever
    their decoders. An fp32 model and its bf16 copy share it (half=True runs under autocast, the
    weights stay fp32); an fp16 cast rounds other bits and changes it."""
    digest = hashlib.sha256()
    for name, t in model.image_encoder.state_dict().items():
        digest.update(f"{name}{tuple(t.shape)}".encode())
        if t.is_floating_point() and t.numel():
            digest.update(t.detach().flatten()[:64].to("cpu", torch.bfloat16).view(torch.int16).numpy().tobytes())
    return digest.hexdigest()[:16]


def _text(s: str) -> torch.Tensor:
    return torch.tensor(list(s.encode("utf-8")), dtype=torch.uint8)  # the file holds tensors only


def save_image_state(state: ImageState, model: nn.Module, path: str | Path) -> Path:
    """Write ``state``, computed by ``model``, to ``path`` atomically (parent folders are made)."""
    feats = state.features
    data = {
        **({f"features.{k}": v.cpu() for k, v in feats.items()} if isinstance(feats, dict)
           else {"features": feats.cpu()}),
        "orig_img": torch.from_numpy(np.ascontiguousarray(state.orig_img)),
        "original_size": torch.tensor(state.original_size),
        "input_size": torch.tensor(state.input_size),
        "img_size": torch.tensor(model.img_size),
        "path": _text(state.path),
        "encoder": _text(encoder_fingerprint(model)),
    }
    return atomic_torch_save(data, path, "image.emb")


def load_image_state(path: str | Path, model: nn.Module) -> ImageState:
    """Read a file of :func:`save_image_state` for ``model`` (features on the CPU); a missing file,
    a damaged one or one made by another model is an error that says so."""
    if not Path(path).is_file():
        raise ImageNotFoundError(f"embedding file not found: '{path}'")
    try:
        data = torch.load(path, map_location="cpu", weights_only=True)
        feats = data["features"] if "features" in data else {
            k.split(".", 1)[1]: v for k, v in data.items() if k.startswith("features.")}
        img = data["orig_img"].numpy()
        orig, inp, size = tuple(data["original_size"].tolist()), tuple(data["input_size"].tolist()), int(data["img_size"])
        name = bytes(data["path"].tolist()).decode("utf-8") if "path" in data else str(path)
        encoder = bytes(data["encoder"].tolist()).decode("ascii") if "encoder" in data else None
    except Exception as e:  # any damage shows up as any exception inside torch.load or here
        # (not torch's own advice, which may suggest weights_only=False: unsafe for a file of unknown origin)
        raise SegAnyError(f"'{path}' is not an embedding saved by Predictor.save_embedding "
                          f"({type(e).__name__}: {short_reason(e, sentence=True)}); make one with "
                          "set_image(...) then save_embedding(path)") from None
    main = feats if isinstance(feats, torch.Tensor) else feats.get("image_embed")
    pe = model.prompt_encoder
    want = (1, pe.embed_dim, *pe.image_embedding_size)
    wants_levels = isinstance(model, Sam2)  # SAM 2's features are a dict of levels, SAM's one tensor
    if (size != model.img_size or not isinstance(main, torch.Tensor) or tuple(main.shape) != want
            or isinstance(feats, dict) != wants_levels):
        got = tuple(main.shape) if isinstance(main, torch.Tensor) else None
        kind = "SAM 2 feature levels" if isinstance(feats, dict) else "a SAM embedding"
        raise SegAnyError(f"'{path}' was computed for another model (input size {size}, {kind} {got}); "
                          f"this model takes input size {model.img_size} and embeddings {want}: "
                          "encode the image again with set_image")
    if encoder is not None and encoder != encoder_fingerprint(model):
        raise SegAnyError(f"'{path}' was computed by another model's image encoder (other weights): "
                          "its masks would be wrong with this model's. Encode the image again with set_image")
    return ImageState(img, name, orig, inp, feats)
