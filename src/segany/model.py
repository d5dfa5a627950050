"""``SAM``: the user-facing model (SPEC §1, §3)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Sequence

import torch
from torch import nn

from .config import DEFAULT_MODEL
from .models import ModelConfig
from .engine.predictor import Predictor
from .engine.profile import format_summary, layer_table, summarize


class SAM:
    """A Segment Anything model loaded from a checkpoint name or path.

    >>> model = SAM("sam_b.pt")
    >>> results = model("bus.jpg", bboxes=[439, 437, 524, 709])
    """

    def __init__(self, model: str | os.PathLike | None = DEFAULT_MODEL, device: str = "",
                 config: ModelConfig | None = None) -> None:
        """``config`` replaces recognising the architecture from the tensors, for what they cannot
        tell (a custom-size SAM 2's heads, global blocks and input size; see ``checkpoints.load_model``)."""
        model = DEFAULT_MODEL if model is None else model  # None: the default model, as when nothing is named
        self.predictor = Predictor(overrides=dict(model=model, device=device), config=config)
        self.ckpt_path: str = self.predictor.args["model"]  # the resolved file
        # The name as typed ("sam_b.pt" → "sam_b"), not the cache's file name: exported files are named after it.
        self._stem = Path(str(model)).stem
        self.config = self.predictor.model_config

    @property
    def model(self) -> nn.Module:
        """The underlying ``nn.Module`` (:class:`segany.models.Sam`)."""
        return self.predictor.model

    @property
    def device(self) -> torch.device:
        return self.predictor.device

    def __call__(self, source: Any = None, stream: bool = False, bboxes=None, points=None, labels=None,
                 masks=None, **kwargs: Any):
        """Same as :meth:`predict`."""
        return self.predict(source, stream, bboxes=bboxes, points=points, labels=labels, masks=masks, **kwargs)

    def predict(self, source: Any = None, stream: bool = False, bboxes=None, points=None, labels=None,
                masks=None, **kwargs: Any):
        """Prompted segmentation of ``source`` (segment-everything when no prompt is given).

        Without ``source``, the image of the previous call is reused with its cached embedding.
        Returns a list of :class:`~segany.engine.results.Results`, or a generator with ``stream=True``.
        """
        return self.predictor(source, stream=stream, bboxes=bboxes, points=points, labels=labels, masks=masks,
                              **kwargs)

    def info(self, detailed: bool = False, verbose: bool = True) -> dict[str, Any]:
        """Print one summary line (and a per-module table with ``detailed=True``); return the figures."""
        s = summarize(self.model, self.config, self.ckpt_path)
        if verbose:
            print(format_summary(s))
            if detailed:
                print(layer_table(self.model))
        return s

    def train(self, data: Any = None, **kwargs: Any) -> dict[str, Any]:
        """Fine-tune this model in place on ``data`` (COCO JSON, YOLO-seg folder, ``"synthetic:N"``);
        see :func:`segany.train.train` for the options. With ``resume=`` (a run folder), ``data``
        may be left out: the run's own is used, and its ``last.pt`` is loaded into this model.
        Returns the run summary (checkpoint paths...)."""
        from .train import train

        kwargs.setdefault("device", self.device)
        # Before training: the cached embedding (and the logits that earlier results make when
        # first read, see Predictor.image) come from the weights as they are now.
        self.predictor.reset_image()
        # self, not self.model: the run records the checkpoint this model was loaded from.
        return train(self, data, **kwargs)

    def val(self, data: Any, **kwargs: Any) -> dict[str, Any]:
        """Box / point / multi-point mIoU on ``data``; see :func:`segany.train.val`."""
        from .train import val

        kwargs.setdefault("device", self.device)
        return val(self.model, data, **kwargs)

    def save(self, path: str | os.PathLike) -> Path:
        """Write the weights as a checkpoint (a plain state dict with the official key names),
        atomically; ``SAM(path)`` loads it back. Returns the path."""
        from .onnx_export import save_checkpoint

        return save_checkpoint(self.model, path)

    def export(self, format: str = "onnx", file: str | os.PathLike | None = None,
               parts: str | Sequence[str] = ("encoder", "decoder"), opset: int | None = None,
               return_single_mask: bool = False) -> dict[str, Path]:
        """Export SAM / MobileSAM to ONNX: ``<stem>_encoder.onnx`` (preprocessed ``(1, 3, S, S)``
        image → embedding) and ``<stem>_decoder.onnx`` (the layout of Meta's ONNX decoder: see
        :class:`segany.onnx_export.OnnxDecoder`). ``file``: the stem (default: the model's name as
        given to ``SAM``, e.g. ``sam_b`` for ``"sam_b.pt"``, in the current folder), a folder to write
        the default names in (one that exists, or a path ending in a separator), or with one part,
        the ``.onnx`` file itself. ``parts``: "encoder", "decoder" or both. Returns ``{part: path}``.
        Needs ``pip install 'segany[export]'``."""
        from .errors import ConfigError
        from .onnx_export import OPSET, export_onnx

        if format != "onnx":
            raise ConfigError(f"format={format!r}: segany exports to 'onnx' only (model.save() writes a checkpoint)")
        return export_onnx(self.model, self.config.family, file, parts, opset or OPSET, return_single_mask,
                           name=self._stem)

    def __repr__(self) -> str:
        return f"SAM({self.config.name!r}, device={self.device})"
