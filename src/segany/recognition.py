"""Architecture recognition: a state dict's tensors (key names and shapes) → its
:class:`~segany.models.registry.ModelConfig` — the registry entry when they match one exactly,
else a custom config read off the shapes. Never the file name: renamed, fine-tuned and
custom-size files are recognised alike."""

from __future__ import annotations

import dataclasses
import re
from typing import Any

import torch

from .errors import StateDictMismatchError, UnknownArchitectureError, short_reason, warn
from .models.registry import MODELS, SAM_DECODER, ModelConfig, find_config

StateDict = dict[str, torch.Tensor]


@dataclasses.dataclass
class RecognitionNotes:
    """What recognition did not read off the tensors. ``absent``: optional tensors found missing and
    read as a choice (no ``pos_embed``: no absolute positions; no memory ``out_proj``: memory width =
    decoder width); if one was in fact lost, the file reads as another size and the load error must
    name it first. ``assumed``: values taken without evidence (a custom SAM 2's heads)."""

    absent: list[str] = dataclasses.field(default_factory=list)
    assumed: dict[str, Any] = dataclasses.field(default_factory=dict)

    def get(self, sd: StateDict, key: str, *also: str) -> torch.Tensor | None:
        """``sd.get(key)``, noting ``key`` (and its absent companions ``also``) when it is absent."""
        if key not in sd:
            self.absent += [k for k in (key, *also) if k not in sd]
        return sd.get(key)


def infer_config(sd: StateDict, name: str = "custom") -> ModelConfig:
    """Recognise the architecture of a state dict and return its :class:`ModelConfig`.

    The registry entry is returned when the tensors match one exactly (so ``info()`` can say
    ``sam_b``), otherwise a custom config read off the shapes.
    """
    return recognise(sd, name, RecognitionNotes())


def recognise(sd: StateDict, name: str, notes: RecognitionNotes) -> ModelConfig:
    """:func:`infer_config`, writing what it could not read off the tensors into ``notes``."""
    if "image_encoder.trunk.patch_embed.proj.weight" in sd:
        return _sam2_config(sd, name, notes)
    if any(k.startswith(("image_encoder.trunk.", "memory_attention.", "sam_mask_decoder.")) for k in sd):
        raise UnknownArchitectureError(
            "this looks like a SAM 2 / SAM 2.1 checkpoint, but it has no Hiera patch embedding "
            "(image_encoder.trunk.patch_embed.proj.weight): the file is incomplete or from another model"
        )
    if "image_encoder.patch_embed.proj.weight" in sd:
        family, params = "sam_vit", _read_params(sd, "SAM ViT", _vit_encoder_params, notes)
    elif "image_encoder.patch_embed.seq.0.c.weight" in sd:
        family, params = "mobile_sam", _read_params(sd, "MobileSAM (TinyViT)", _tiny_vit_params, notes)
    else:
        sample = ", ".join(list(sd)[:5])
        raise UnknownArchitectureError(
            f"the tensors match no known architecture (first keys: {sample}). Supported: SAM ViT-B/L/H "
            f"and custom ViT sizes, MobileSAM, SAM 2 / SAM 2.1 Hiera ({', '.join(MODELS)})."
        )
    with_pos = {**params, "encoder": {k: v for k, v in params["encoder"].items() if k != "use_abs_pos"}}
    for cfg in MODELS.values():
        if cfg.family == family and _same(cfg.params, params):
            return cfg
        # Every official SAM ViT has pos_embed: one lacking only that lost it (no shape shows it).
        if cfg.family == family and params["encoder"].get("use_abs_pos") is False and _same(cfg.params, with_pos):
            raise StateDictMismatchError(
                f"this looks like {cfg.name} ({cfg.description}), but it lacks the tensor image_encoder.pos_embed "
                "that every official SAM ViT has: the file is incomplete, damaged or was saved from a modified model")
    return ModelConfig(name=name, family=family, params=params, description=f"custom {family}")


def _read_params(sd: StateDict, family: str, encoder_params, notes: RecognitionNotes) -> dict[str, Any]:
    """Builder parameters of a SAM 1 state dict; a tensor missing or of an impossible shape is a
    :class:`StateDictMismatchError` that names it."""
    try:
        return {"encoder": encoder_params(sd, notes), **_decoder_params(sd)}
    except KeyError as e:
        problem = f"lacks the tensor {e.args[0]}"
    except (IndexError, ValueError, ZeroDivisionError, AttributeError) as e:
        problem = f"has tensors of impossible shapes ({type(e).__name__}: {short_reason(e)})"
    raise StateDictMismatchError(f"this looks like a {family} checkpoint, but it {problem}: the file is "
                                 "incomplete, damaged or was saved from a modified model") from None


def _sam2_config(sd: StateDict, name: str, notes: RecognitionNotes) -> ModelConfig:
    """SAM 2 vs SAM 2.1 and the Hiera size, read off the tensors (see :func:`_sam2_params`).

    A file whose name says one registry model but whose tensors are another (a SAM 2 file
    named ``sam2.1_t.pt``) loads as what it is, with a warning that says so.
    """
    try:
        params = _sam2_params(sd, notes)
    except KeyError as e:
        raise StateDictMismatchError(
            f"this looks like a SAM 2 / SAM 2.1 checkpoint (it has a Hiera image encoder), but it lacks "
            f"the tensor {e.args[0]}: the file is incomplete or was saved from a modified model"
        ) from None
    version = params["version"]
    found = next((cfg for cfg in MODELS.values() if cfg.family == "sam2" and _same(cfg.params, params)), None)
    named = find_config(name) or find_config(f"{name}.pt")
    if named is not None and named is not found:
        what = found.name if found is not None else f"a custom SAM {version} size"
        warn(
            f"checkpoint '{name}' is named like {named.name} ({named.description}) but its tensors are "
            f"SAM {version}: {what}; loading it as what it is",
        )
    if found is not None:
        return found
    label = f"sam{version}_custom" if named is not None else name
    return ModelConfig(name=label, family="sam2", params=params, description=f"custom SAM {version} (Hiera)")


def _sam2_params(sd: StateDict, notes: RecognitionNotes) -> dict[str, Any]:
    """Builder parameters of a SAM 2 state dict.

    Readable from the tensors: SAM 2 vs 2.1 (2.1 adds ``no_obj_embed_spatial`` and
    ``obj_ptr_tpos_proj``), the Hiera width, stage depths (a stage starts at each block with a
    ``proj`` shortcut), width and MLP multipliers, first-stage window and background
    position-table size, and the decoder/memory widths. Not in the tensors: head counts, global
    blocks, later window sizes and the image size; those come from the official model with the
    same width and depths, else from Hiera-T's pattern (1 head, the last stride-16 block global)
    at 1024 pixels, noted in ``notes.assumed`` (:func:`load_model` warns).
    """
    t = "image_encoder.trunk."
    embed_dim = sd[t + "patch_embed.proj.weight"].shape[0]
    depth = _count(sd, r"image_encoder\.trunk\.blocks\.(\d+)\.")
    starts = [i for i in range(depth) if f"{t}blocks.{i}.proj.weight" in sd]
    bounds = [0, *starts, depth]
    stages = tuple(b - a for a, b in zip(bounds, bounds[1:]))
    version = "2.1" if "no_obj_embed_spatial" in sd or "obj_ptr_tpos_proj.weight" in sd else "2"
    d_model = sd["image_encoder.neck.convs.0.conv.weight"].shape[0]
    out_proj = notes.get(sd, "memory_encoder.out_proj.weight", "memory_encoder.out_proj.bias")
    tpos = notes.get(sd, "maskmem_tpos_enc")
    heads = dict(
        d_model=d_model,
        mem_dim=out_proj.shape[0] if out_proj is not None else d_model,  # mem_dim == d_model: no out_proj
        num_maskmem=tpos.shape[0] if tpos is not None else 7,
        memory_layers=_count(sd, r"memory_attention\.layers\.(\d+)\."),
    )
    official = next((cfg.params["encoder"] for cfg in MODELS.values() if cfg.family == "sam2"
                     and cfg.params["encoder"]["embed_dim"] == embed_dim
                     and tuple(cfg.params["encoder"]["stages"]) == stages), None)
    if official is not None:
        encoder = dict(official)
    else:
        n = len(stages)
        encoder = dict(img_size=1024, embed_dim=embed_dim, num_heads=1, stages=stages,
                       global_att_blocks=(sum(stages[:3]) - 1,) if n >= 3 else (),
                       window_spec=((8, 4, 14, 7) + (7,) * n)[:n])
        if n != 4:
            encoder["q_pool"] = n - 1
    window0 = sd[t + "pos_embed_window"].shape[-1]
    encoder["window_spec"] = (window0, *encoder["window_spec"][1:])
    encoder["window_pos_embed_bkg_spatial_size"] = tuple(sd[t + "pos_embed"].shape[-2:])
    if official is None:
        notes.assumed = {k: encoder[k] for k in ("num_heads", "global_att_blocks", "window_spec", "img_size")}
    if starts:
        dim_mul = sd[f"{t}blocks.{starts[0]}.proj.weight"].shape[0] / embed_dim
        if dim_mul != 2.0:
            encoder["dim_mul"] = dim_mul
    mlp_ratio = sd[t + "blocks.0.mlp.layers.0.weight"].shape[0] / embed_dim
    if mlp_ratio != 4.0:
        encoder["mlp_ratio"] = mlp_ratio
    return dict(encoder=encoder, version=version, **heads)


def _same(a: dict, b: dict) -> bool:
    norm = lambda d: {k: (tuple(v) if isinstance(v, list) else v) for k, v in d.items()}  # noqa: E731
    return norm({**a, "encoder": norm(a["encoder"])}) == norm({**b, "encoder": norm(b["encoder"])})


def _count(sd: StateDict, pattern: str) -> int:
    rx = re.compile(pattern)
    return len({m.group(1) for k in sd if (m := rx.match(k))})


def _vit_encoder_params(sd: StateDict, notes: RecognitionNotes) -> dict[str, Any]:
    patch = sd["image_encoder.patch_embed.proj.weight"]  # (embed_dim, 3, p, p)
    embed_dim, patch_size = patch.shape[0], patch.shape[-1]
    depth = _count(sd, r"image_encoder\.blocks\.(\d+)\.")
    pos = notes.get(sd, "image_encoder.pos_embed")  # (1, S/p, S/p, C)
    img_size = pos.shape[1] * patch_size if pos is not None else 1024
    grid = img_size // patch_size
    rel = [sd.get(f"image_encoder.blocks.{i}.attn.rel_pos_h") for i in range(depth)]
    use_rel_pos = notes.get(sd, *(f"image_encoder.blocks.0.attn.rel_pos_{a}" for a in "hw")) is not None
    if use_rel_pos:
        head_dim = rel[0].shape[1]
        global_idx = tuple(i for i, r in enumerate(rel) if r.shape[0] == 2 * grid - 1)
        windowed = [r.shape[0] for r in rel if r.shape[0] != 2 * grid - 1]
        window_size = (windowed[0] + 1) // 2 if windowed else 14
    else:  # without relative positions, neither head count nor windows show in the tensors
        head_dim, global_idx, window_size = 64, (), 14
    mlp_dim = sd["image_encoder.blocks.0.mlp.lin1.weight"].shape[0]
    return dict(
        img_size=img_size,
        patch_size=patch_size,
        embed_dim=embed_dim,
        depth=depth,
        num_heads=embed_dim // head_dim,
        mlp_ratio=mlp_dim / embed_dim,
        window_size=window_size,
        global_attn_indexes=global_idx,
        **({} if use_rel_pos else {"use_rel_pos": False}),
        **({} if pos is not None else {"use_abs_pos": False}),
        **({} if notes.get(sd, "image_encoder.blocks.0.attn.qkv.bias") is not None else {"qkv_bias": False}),
    )


def _tiny_vit_params(sd: StateDict, notes: RecognitionNotes) -> dict[str, Any]:
    n_layers = _count(sd, r"image_encoder\.layers\.(\d+)\.")
    depths = tuple(_count(sd, rf"image_encoder\.layers\.{i}\.blocks\.(\d+)\.") for i in range(n_layers))
    embed_dims = [sd["image_encoder.patch_embed.seq.2.c.weight"].shape[0]]
    heads, windows = [], []
    for i in range(1, n_layers):
        embed_dims.append(sd[f"image_encoder.layers.{i}.blocks.0.attn.norm.weight"].shape[0])
        bias = sd[f"image_encoder.layers.{i}.blocks.0.attn.attention_biases"]  # (heads, ws*ws)
        heads.append(bias.shape[0])
        windows.append(round(bias.shape[1] ** 0.5))
    expand = sd["image_encoder.layers.0.blocks.0.conv1.c.weight"].shape[0] / embed_dims[0]
    mlp_ratio = sd["image_encoder.layers.1.blocks.0.mlp.fc1.weight"].shape[0] / embed_dims[1]
    head = notes.get(sd, "image_encoder.head.weight", "image_encoder.head.bias")
    # Stage 0 is convolutional; its head count and window size are unused but kept as MobileSAM's.
    return dict(
        img_size=1024,  # TinyViT holds no positional table: the size does not show in the tensors
        embed_dims=tuple(embed_dims),
        depths=depths,
        num_heads=(max(1, embed_dims[0] // 32), *heads),
        window_sizes=(windows[0], *windows),
        mlp_ratio=mlp_ratio,
        mbconv_expand_ratio=expand,
        local_conv_size=sd["image_encoder.layers.1.blocks.0.local_conv.c.weight"].shape[-1],
        num_classes=head.shape[0] if head is not None else 1000,
    )


def _decoder_params(sd: StateDict) -> dict[str, Any]:
    dim = sd["prompt_encoder.no_mask_embed.weight"].shape[1]
    iou_layers = _count(sd, r"mask_decoder\.iou_prediction_head\.layers\.(\d+)\.")
    return dict(
        SAM_DECODER,
        prompt_embed_dim=dim,
        mask_in_chans=sd["prompt_encoder.mask_downscaling.3.weight"].shape[0],
        decoder_depth=_count(sd, r"mask_decoder\.transformer\.layers\.(\d+)\."),
        decoder_mlp_dim=sd["mask_decoder.transformer.layers.0.mlp.lin1.weight"].shape[0],
        num_multimask_outputs=sd["mask_decoder.mask_tokens.weight"].shape[0] - 1,
        iou_head_depth=iou_layers,
        iou_head_hidden_dim=sd["mask_decoder.iou_prediction_head.layers.0.weight"].shape[0],
    )
