"""Low-res logits made when first read, from the weights of the prediction or not at all.

A prompt on a predictor's set image (on a CPU) upscales only the part of SAM's low-res logits
its masks read; the whole logits, for ``masks=`` refinement, are made by decoding again when
``Results.low_res_logits`` is first read (see ``Predictor._run``). Decoding again gives the
prediction's logits only if the decoder's weights are still those of the prediction: any
in-place change since (an optimizer step, ``load_state_dict``, a shared model trained by
another ``SAM``) bumps a tensor's version counter, and the logits are then refused with an error
instead of being made from other weights.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable

import torch
from torch import nn

from ..errors import WeightsChangedError

# The decoder-side tensors of a model, listed once per model: listing them walks every submodule
# (~0.2 ms for SAM's decoder, 1 % of a box prompt); weights are changed in place, not replaced.
_DECODER_TENSORS: weakref.WeakKeyDictionary[nn.Module, list[torch.Tensor]] = weakref.WeakKeyDictionary()


def _decoder_tensors(model: nn.Module) -> list[torch.Tensor]:
    tensors = _DECODER_TENSORS.get(model)
    if tensors is None:
        parts = [m for m in (getattr(model, "prompt_encoder", None), getattr(model, "mask_decoder", None))
                 if isinstance(m, nn.Module)] or [model]
        tensors = [t for m in parts for t in (*m.parameters(), *m.buffers())]
        _DECODER_TENSORS[model] = tensors
    return tensors


def _versions(tensors: list[torch.Tensor]) -> tuple[int, ...] | None:
    """The tensors' version counters, or None where one has none (an inference-mode tensor)."""
    try:
        return tuple(t._version for t in tensors)
    except RuntimeError:
        return None


class DeferredLogits:
    """``make()`` (the whole logits, by decoding again) run on first call, and only while the
    decoder's weights are unchanged since this object was made."""

    def __init__(self, make: Callable[[], torch.Tensor], model: nn.Module) -> None:
        self._make, self._tensors = make, _decoder_tensors(model)
        self._versions = _versions(self._tensors)

    def __call__(self) -> torch.Tensor:
        if self._versions is not None and _versions(self._tensors) != self._versions:
            raise WeightsChangedError(
                "low_res_logits of this result were to be made when first read, and the model's weights "
                "have changed since the prediction (training, load_state_dict): read results[i].low_res_logits "
                "before changing the weights, or predict again")
        return self._make()


def refused(error: WeightsChangedError) -> Callable[[], torch.Tensor]:
    """A stand-in for deferred logits that can no longer be made: raises ``error`` when read
    (and holds nothing else, such as the image's embedding)."""
    def read() -> torch.Tensor:
        raise WeightsChangedError(str(error))
    return read
