"""Saving a model's weights and exporting SAM / MobileSAM to ONNX (``SAM.save``, ``SAM.export``).

The decoder file has the inputs and outputs of Meta's ``segment_anything/utils/onnx.py``
(``SamOnnxModel``, exported by ``scripts/export_onnx_model.py``), so code written for Meta's ONNX
decoder runs on ours; the encoder file maps a preprocessed, padded image to its embedding.
"""

from __future__ import annotations

import os
import tempfile
import warnings
from pathlib import Path
from typing import Sequence

import torch
from torch import nn
from torch.nn import functional as F

from .engine.export import atomic_torch_save
from .errors import ConfigError, MissingDependencyError, NotAvailableError

PARTS = ("encoder", "decoder")
DECODER_INPUTS = ("image_embeddings", "point_coords", "point_labels", "mask_input", "has_mask_input", "orig_im_size")
DECODER_OUTPUTS = ("masks", "iou_predictions", "low_res_masks")
ENCODER_INPUTS, ENCODER_OUTPUTS = ("image",), ("image_embeddings",)
OPSET = 18  # onnxruntime ≥ 1.14 runs it; torch's exporter writes opset 18 natively (no version conversion)


def save_checkpoint(model: nn.Module, path: str | os.PathLike) -> Path:
    """Write ``model``'s weights as a plain state dict with the official key names (what
    :func:`segany.checkpoints.load_model` reads), atomically: a reader never sees a half-written file."""
    # On the CPU (the file loads on any machine) and contiguous (a view would drag its whole storage
    # in); both are no-ops, not copies, for the usual CPU parameters.
    sd = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    return atomic_torch_save(sd, path)


def require_onnx() -> None:
    """Raise :class:`MissingDependencyError` (naming the pip command) unless the exporter's packages import."""
    for name in ("onnx", "onnxscript"):  # torch.onnx.export(dynamo=True) builds the graph with onnxscript
        try:
            __import__(name)
        except ImportError as e:
            raise MissingDependencyError(
                f"ONNX export needs the '{name}' package, which is not installed ({e}): "
                f"pip install 'segany[export]'  (or: pip install onnx onnxscript onnxruntime)") from None


class OnnxDecoder(nn.Module):
    """Prompt encoder + mask decoder + mask upscaling with the inputs and outputs of Meta's
    ``SamOnnxModel``, composed from the model's modules as the reference composes them (no fused
    or shared-image fast paths: they branch on the number of prompt tokens, which is dynamic here).

    Inputs: ``image_embeddings (1, C, h, w)``; ``point_coords (1, N, 2)`` float, pixels of the
    model's input frame (the longest side resized to ``img_size``); ``point_labels (1, N)`` float:
    1 positive, 0 negative, 2 / 3 a box's top-left / bottom-right corner, -1 padding (a point
    ``(0, 0)`` labelled -1 must end a prompt without a box, as in Meta's example);
    ``mask_input (1, 1, 4h, 4w)`` logits; ``has_mask_input (1,)`` 1.0 or 0.0; ``orig_im_size (2,)``
    float ``(H, W)``. Outputs: ``masks (1, K, H, W)`` logits at the original size (threshold 0),
    ``iou_predictions (1, K)``, ``low_res_masks (1, K, 4h, 4w)``; K = 4 (the single-mask output
    first, then the 3 multimask outputs) or 1 with ``return_single_mask`` (Meta's choice by the
    number of points).
    """

    def __init__(self, sam: nn.Module, return_single_mask: bool = False) -> None:
        super().__init__()
        # Only the parts it runs: the encoder's weights would be lifted into the export for nothing.
        self.prompt_encoder, self.mask_decoder = sam.prompt_encoder, sam.mask_decoder
        self.img_size = int(sam.img_size)
        self.return_single_mask = return_single_mask

    def _embed_points(self, coords: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """``(1, N, 2)`` coordinates, ``(1, N)`` labels → sparse embeddings ``(1, N, C)``: box
        corners are points labelled 2 and 3, so points and boxes share one input, as in Meta's file."""
        pe = self.prompt_encoder
        emb = pe.pe_layer.forward_with_coords(coords + 0.5, pe.input_image_size)  # to the pixel centre
        labels = labels.unsqueeze(-1)
        emb = emb * (labels != -1) + pe.not_a_point_embed.weight * (labels == -1)
        for i, point_embed in enumerate(pe.point_embeddings):
            emb = emb + point_embed.weight * (labels == i)
        return emb

    def _decode(self, image: torch.Tensor, sparse: torch.Tensor, dense: torch.Tensor
                ) -> tuple[torch.Tensor, torch.Tensor]:
        """Embedding ``(1, C, h, w)``, sparse ``(1, N, C)``, dense ``(1, C, h, w)`` → low-res
        logits of every mask token ``(1, T, 4h, 4w)`` and their IoU ``(1, T)`` (Meta's predict_masks)."""
        pe, dec = self.prompt_encoder, self.mask_decoder
        t = dec.transformer
        image_pe = pe.pe_layer(pe.image_embedding_size).unsqueeze(0)
        b, c, h, w = image.shape
        output_tokens = torch.cat([dec.iou_token.weight, dec.mask_tokens.weight], dim=0)
        tokens = torch.cat([output_tokens.unsqueeze(0).expand(sparse.shape[0], -1, -1), sparse], dim=1)
        keys = (image + dense).flatten(2).transpose(1, 2)  # (1, h*w, C)
        key_pe = image_pe.flatten(2).transpose(1, 2)
        queries = tokens
        for layer in t.layers:  # each block's reference composition (its fused path specialises on N)
            queries, keys = layer._forward_modules(queries, keys, tokens, key_pe)
        attn = t.final_attn_token_to_image(q=queries + tokens, k=keys + key_pe, v=keys)
        queries = t.norm_final_attn(queries + attn)
        upscaled = dec.output_upscaling(keys.transpose(1, 2).reshape(b, c, h, w))
        masks = dec._masks_from_tokens(queries[:, 1 : 1 + dec.num_mask_tokens], upscaled)
        return masks, dec.iou_prediction_head(queries[:, 0])

    def _postprocess(self, masks: torch.Tensor, orig_im_size: torch.Tensor) -> torch.Tensor:
        """Low-res logits ``(1, K, s, s)`` → logits at the original size ``(1, K, H, W)``: upsample
        to the padded input, drop the padding, upsample to ``orig_im_size``, as segany and Meta do."""
        size = orig_im_size.to(torch.float64)  # float64: the same rounding as Sam.input_size's Python floats
        scale = self.img_size / size.max()
        input_hw = torch.clamp(torch.floor(size * scale + 0.5), min=1).to(torch.int64)
        orig_hw = orig_im_size.to(torch.int64)
        ih, iw, oh, ow = (v.item() for v in (input_hw[0], input_hw[1], orig_hw[0], orig_hw[1]))
        torch._check(ih <= self.img_size)
        torch._check(iw <= self.img_size)
        torch._check(oh >= 1)
        torch._check(ow >= 1)
        x = F.interpolate(masks, (self.img_size, self.img_size), mode="bilinear", align_corners=False)
        return F.interpolate(x[..., :ih, :iw], (oh, ow), mode="bilinear", align_corners=False)

    def forward(self, image_embeddings: torch.Tensor, point_coords: torch.Tensor, point_labels: torch.Tensor,
                mask_input: torch.Tensor, has_mask_input: torch.Tensor, orig_im_size: torch.Tensor
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        pe = self.prompt_encoder
        sparse = self._embed_points(point_coords, point_labels)
        no_mask = pe.no_mask_embed.weight.reshape(1, -1, 1, 1)
        dense = has_mask_input * pe.mask_downscaling(mask_input) + (1 - has_mask_input) * no_mask
        masks, iou = self._decode(image_embeddings, sparse, dense)
        if self.return_single_mask:
            # Meta's choice without control flow: the single-mask output for more than 2 points
            # (a box counts as 2), else the multimask output with the best predicted IoU.
            reweight = iou.new_tensor([[1000.0] + [0.0] * (iou.shape[1] - 1)])
            best = torch.argmax(iou + (point_coords.shape[1] - 2.5) * reweight, dim=1)
            rows = torch.arange(masks.shape[0])
            masks, iou = masks[rows, best].unsqueeze(1), iou[rows, best].unsqueeze(1)
        return self._postprocess(masks, orig_im_size), iou, masks


class OnnxEncoder(nn.Module):
    """Preprocessed image ``(1, 3, S, S)`` (normalised with SAM's mean and std, zero-padded
    bottom-right to ``S × S``, S = ``img_size``) → image embedding ``(1, C, S/16, S/16)``."""

    def __init__(self, sam: nn.Module) -> None:
        super().__init__()
        self.image_encoder = sam.image_encoder

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        return self.image_encoder(image)


def decoder_example_inputs(sam: nn.Module, n_points: int = 3) -> tuple[torch.Tensor, ...]:
    """Example decoder inputs (``DECODER_INPUTS`` order) for ``sam``, on its device."""
    pe = sam.prompt_encoder
    g = torch.Generator().manual_seed(0)
    return tuple(t.to(sam.device) for t in (
        torch.randn(1, pe.embed_dim, *pe.image_embedding_size, generator=g),
        torch.randint(0, sam.img_size, (1, n_points, 2), generator=g).float(),
        torch.tensor([[1.0, 0.0, -1.0, 2.0, 3.0][i % 5] for i in range(n_points)]).unsqueeze(0),
        torch.randn(1, 1, *pe.mask_input_size, generator=g),
        torch.tensor([1.0]),
        torch.tensor([float(sam.img_size) * 3 / 4, float(sam.img_size)]),
    ))


def export_onnx(sam: nn.Module, family: str, file: str | os.PathLike | None = None,
                parts: str | Sequence[str] = PARTS, opset: int = OPSET, return_single_mask: bool = False,
                name: str = "sam") -> dict[str, Path]:
    """Export ``parts`` of ``sam`` (a :class:`segany.models.Sam` of ``family``): "encoder",
    "decoder" or both, to ONNX files.

    With one part and ``file`` ending in ``.onnx``, that is the file written; a ``file`` that is a
    folder (one that exists, or a path ending in a separator) gets ``<name>_encoder.onnx`` and
    ``<name>_decoder.onnx``; otherwise ``file`` (less a ``.onnx`` suffix) is the stem of
    ``<stem>_encoder.onnx`` and ``<stem>_decoder.onnx``. ``file=None``: ``name`` in the current
    folder. Returns ``{part: path}``.
    """
    if family not in ("sam_vit", "mobile_sam"):
        what = "SAM 2 / SAM 2.1" if family == "sam2" else repr(family)
        raise NotAvailableError(
            f"ONNX export is available for SAM (ViT-B/L/H) and MobileSAM models, not yet for {what} models "
            f"(their encoder gives several feature levels, their decoder other inputs than Meta's SAM ONNX "
            f"layout); model.save() writes a checkpoint of any model")
    parts = (parts,) if isinstance(parts, str) else tuple(parts)
    unknown = [p for p in parts if p not in PARTS]
    if unknown or not parts:
        raise ConfigError(f"parts={unknown or parts!r}: choose 'encoder', 'decoder' or both")
    require_onnx()
    targets = output_paths(file, parts, name)
    was_training = sam.training
    sam.eval()
    try:
        for part, path in targets.items():
            if part == "encoder":
                x = torch.zeros(1, 3, sam.img_size, sam.img_size, device=sam.device)
                _export(OnnxEncoder(sam), (x,), path, ENCODER_INPUTS, ENCODER_OUTPUTS, None, opset)
            else:
                n = torch.export.Dim("num_points", min=1)
                shapes = (None, {1: n}, {1: n}, None, None, None)
                _export(OnnxDecoder(sam, return_single_mask), decoder_example_inputs(sam), path,
                        DECODER_INPUTS, DECODER_OUTPUTS, shapes, opset)
    finally:
        sam.train(was_training)
    return targets


def output_paths(file: str | os.PathLike | None, parts: Sequence[str], name: str) -> dict[str, Path]:
    """Where each part of an export goes (see :func:`export_onnx`)."""
    if file is None:
        file = name
    text = os.fspath(file)
    # Path() drops a trailing separator, and "out/" names a folder (made if need be), as "out" does
    # when it exists: the files go in it, not beside it as out_encoder.onnx.
    if text.endswith(tuple(s for s in (os.sep, os.altsep) if s)) or Path(text).is_dir():
        file = Path(text) / name
    file = Path(file)
    if len(parts) == 1 and file.suffix == ".onnx":
        return {parts[0]: file}
    stem = file.with_suffix("") if file.suffix == ".onnx" else file
    return {p: stem.with_name(f"{stem.name}_{p}.onnx") for p in PARTS if p in parts}


def _export(module: nn.Module, args: tuple, path: Path, inputs: Sequence[str], outputs: Sequence[str],
            dynamic_shapes, opset: int) -> None:
    """``torch.onnx.export`` of ``module`` into a temporary folder beside ``path``, then moved into
    place: a reader never sees half a file. (A model over 2 GB keeps its weights in ``<name>.data``
    beside the file, moved first, as ONNX requires of such files.)"""
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=path.parent, prefix=f".{path.name}.") as tmp:
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the exporter's own deprecation and tracing notes
            program = torch.onnx.export(module, args, dynamo=True, input_names=list(inputs),
                                        output_names=list(outputs), dynamic_shapes=dynamic_shapes,
                                        opset_version=opset, verbose=False)
        program.save(os.path.join(tmp, path.name))
        written = sorted(os.listdir(tmp), key=lambda name: name == path.name)  # the .onnx file last
        for name in written:
            os.replace(os.path.join(tmp, name), path.parent / name)


EXPORT_HELP = """\
usage: segany export [model=segany_tiny.pt] [format=onnx] [file=None] [parts=both] [key=value ...]

Export a SAM or MobileSAM model to ONNX: <stem>_encoder.onnx (preprocessed, padded image -> image
embedding) and <stem>_decoder.onnx (the inputs and outputs of Meta's ONNX decoder). Needs
pip install 'segany[export]'.
  model               checkpoint name or path       format  onnx (the only one)
  file                stem of the files (default: the model's name, in this folder), a folder
                      (existing, or ending in /) to write them in, or with one part the .onnx file
  parts               both, encoder or decoder      opset   ONNX opset (default 18)
  return_single_mask  the decoder returns Meta's one best mask instead of all 4
  device              '', 'cpu', 'cuda:0', ..."""


def run_export(tokens: list[str]) -> int:
    """``segany export``: prints one ``part: path`` line per file written."""
    from .cli import TEXT_OPTIONS, parse_options
    from .config import DEFAULT_MODEL
    from .model import SAM

    defaults = dict(model=DEFAULT_MODEL, format="onnx", file=None, parts="both", opset=OPSET,
                    return_single_mask=False, device="")
    opts = {**defaults, **parse_options(tokens, defaults, types={"file": ""}, command="export",
                                        texts=TEXT_OPTIONS | {"file", "parts", "format"})}
    parts = PARTS if opts["parts"] in ("both", "all") else str(opts["parts"])
    paths = SAM(str(opts["model"]), device=opts["device"]).export(
        format=str(opts["format"]), file=opts["file"], parts=parts, opset=opts["opset"],
        return_single_mask=opts["return_single_mask"])
    for part, path in paths.items():
        print(f"{part}: {path}")
    return 0
