"""An encoded image (:class:`ImageState`) and its file form (``Predictor.save_embedding`` /
``load_embedding``): tensors only, so a file is read with ``torch.load(weights_only=True)``."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from ..errors import ImageNotFoundError, SegAnyError

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


def save_image_state(state: ImageState, img_size: int, path: str | Path) -> None:
    """Write ``state`` (computed at the model's ``img_size``) to ``path``, atomically."""
    feats = state.features
    data = {
        **({f"features.{k}": v.cpu() for k, v in feats.items()} if isinstance(feats, dict)
           else {"features": feats.cpu()}),
        "orig_img": torch.from_numpy(np.ascontiguousarray(state.orig_img)),
        "original_size": torch.tensor(state.original_size),
        "input_size": torch.tensor(state.input_size),
        "img_size": torch.tensor(img_size),
        "path": torch.tensor(list(state.path.encode("utf-8")), dtype=torch.uint8),  # tensors only
    }
    tmp = Path(str(path) + ".tmp")
    torch.save(data, tmp)
    tmp.replace(path)


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
    except Exception as e:  # any damage shows up as any exception inside torch.load or here
        raise SegAnyError(f"'{path}' is not an embedding saved by Predictor.save_embedding "
                          f"({type(e).__name__}: {str(e).strip()[:200]})") from None
    main = feats if isinstance(feats, torch.Tensor) else feats.get("image_embed")
    pe = model.prompt_encoder
    want = (1, pe.embed_dim, *pe.image_embedding_size)
    if size != model.img_size or not isinstance(main, torch.Tensor) or tuple(main.shape) != want:
        got = tuple(main.shape) if isinstance(main, torch.Tensor) else None
        raise SegAnyError(f"'{path}' was computed for another model (input size {size}, embedding {got}); "
                          f"this model takes input size {model.img_size} and embeddings {want}: "
                          "encode the image again with set_image")
    return ImageState(img, name, orig, inp, feats)
