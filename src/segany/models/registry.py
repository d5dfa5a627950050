"""The one registry of model configurations.

Building (:func:`build_model`), checkpoint recognition and loading (:mod:`segany.checkpoints`),
weight download (:mod:`segany.hub`), ``info()`` and the CLI all read :data:`MODELS`.

A :class:`ModelConfig` names an architecture ``family`` (a key of :data:`BUILDERS`) and the
keyword arguments of its builder. SAM 2 adds its own family and builder without changing this.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

from torch import nn

from .mask_decoder import MaskDecoder
from .prompt_encoder import PromptEncoder
from .sam import Sam
from .transformer import TwoWayTransformer
from .vit import ImageEncoderViT


@dataclass(frozen=True)
class WeightsFile:
    """Where the official weights of a model come from."""

    filename: str  # name in the weights cache
    url: str
    # The published file's SHA-256 and size in bytes, where known. (The hex digits in Meta's file
    # names are the start of the MD5, not of the SHA-256.)
    sha256: str | None = None
    size: int | None = None


@dataclass(frozen=True)
class ModelConfig:
    """One named architecture: ``family`` picks the builder, ``params`` are its arguments."""

    name: str
    family: str
    params: dict[str, Any]
    aliases: tuple[str, ...] = ()  # the file names a user may type
    weights: WeightsFile | None = None
    description: str = ""
    extra: dict[str, Any] = field(default_factory=dict)
    bundled: str | None = None  # a checkpoint shipped in segany/assets: no download, works offline


# Decoder and prompt-encoder settings shared by every SAM (v1) model.
SAM_DECODER = dict(
    prompt_embed_dim=256,
    mask_in_chans=16,
    decoder_depth=2,
    decoder_mlp_dim=2048,
    decoder_heads=8,
    num_multimask_outputs=3,
    iou_head_depth=3,
    iou_head_hidden_dim=256,
)


def _vit(embed_dim: int, depth: int, heads: int, global_attn: tuple[int, ...]) -> dict[str, Any]:
    encoder = dict(
        img_size=1024,
        patch_size=16,
        embed_dim=embed_dim,
        depth=depth,
        num_heads=heads,
        mlp_ratio=4.0,
        window_size=14,
        global_attn_indexes=global_attn,
    )
    return dict(encoder=encoder, **SAM_DECODER)


_META = "https://dl.fbaipublicfiles.com/segment_anything/"

MODELS: dict[str, ModelConfig] = {
    cfg.name: cfg
    for cfg in [
        ModelConfig(
            "sam_b", "sam_vit", _vit(768, 12, 12, (2, 5, 8, 11)),
            aliases=("sam_b.pt", "sam_vit_b_01ec64.pth", "sam_vit_b.pth"),
            weights=WeightsFile("sam_vit_b_01ec64.pth", _META + "sam_vit_b_01ec64.pth",
                                "ec2df62732614e57411cdcf32a23ffdf28910380d03139ee0f4fcbe91eb8c912", 375_042_383),
            description="SAM ViT-B (Meta)",
        ),
        ModelConfig(
            "sam_l", "sam_vit", _vit(1024, 24, 16, (5, 11, 17, 23)),
            aliases=("sam_l.pt", "sam_vit_l_0b3195.pth", "sam_vit_l.pth"),
            weights=WeightsFile("sam_vit_l_0b3195.pth", _META + "sam_vit_l_0b3195.pth",
                                "3adcc4315b642a4d2101128f611684e8734c41232a17c648ed1693702a49a622", 1_249_524_607),
            description="SAM ViT-L (Meta)",
        ),
        ModelConfig(
            "sam_h", "sam_vit", _vit(1280, 32, 16, (7, 15, 23, 31)),
            aliases=("sam_h.pt", "sam_vit_h_4b8939.pth", "sam_vit_h.pth"),
            weights=WeightsFile("sam_vit_h_4b8939.pth", _META + "sam_vit_h_4b8939.pth",
                                "a7bf3b02f3ebf1267aba913ff637d9a2d5c33d3173bb679e46d9f338c26f262e", 2_564_550_879),
            description="SAM ViT-H (Meta)",
        ),
        ModelConfig(
            "mobile_sam", "mobile_sam",
            dict(
                encoder=dict(
                    img_size=1024,
                    embed_dims=(64, 128, 160, 320),
                    depths=(2, 2, 6, 2),
                    num_heads=(2, 4, 5, 10),
                    window_sizes=(7, 7, 14, 7),
                    mlp_ratio=4.0,
                    mbconv_expand_ratio=4.0,
                    local_conv_size=3,
                    num_classes=1000,
                ),
                **SAM_DECODER,
            ),
            aliases=("mobile_sam.pt",),
            weights=WeightsFile(
                "mobile_sam.pt", "https://github.com/ChaoningZhang/MobileSAM/raw/master/weights/mobile_sam.pt",
                "6dbb90523a35330fedd7f1d3dfc66f995213d81b29a5ca8108dbcdd4e37d6c2f", 40_728_226,
            ),
            description="MobileSAM (TinyViT-5M encoder)",
        ),
        ModelConfig(
            # Trained by scripts/train_default_model.py on segany's synthetic shapes: a demo that
            # runs offline on a fresh install, not a substitute for Meta's models.
            "segany_tiny", "sam_vit",
            dict(
                encoder=dict(img_size=256, patch_size=8, embed_dim=128, depth=6, num_heads=4, mlp_ratio=4.0,
                             window_size=8, global_attn_indexes=(2, 5)),
                **dict(SAM_DECODER, prompt_embed_dim=128, decoder_mlp_dim=512, iou_head_hidden_dim=128),
            ),
            aliases=("segany_tiny.pt",),
            description="segany tiny demo model trained on synthetic shapes, not SAM quality",
            bundled="segany_tiny.pt",
            # Its logits are softer than SAM's: SAM's segment-everything filters (0.88 predicted
            # IoU, 0.95 stability) keep little. Chosen on synthetic images of seed 3000 (40 images,
            # recall at IoU 0.8: 0.91 with these, 0.85 with conf_thres 0.8, 0.38 with SAM's).
            extra={"defaults": dict(conf_thres=0.6, stability_score_thresh=0.7)},
        ),
    ]
}


# -- SAM 2 / SAM 2.1 (Hiera) --------------------------------------------------------------------
# Sizes of the parts every official SAM 2 model shares: decoder width, memory width, memory frames,
# memory-attention layers. ``version`` "2.1" adds no_obj_embed_spatial and obj_ptr_tpos_proj.
SAM2_HEADS = dict(d_model=256, mem_dim=64, num_maskmem=7, memory_layers=4)


def _hiera(embed_dim: int, heads: int, stages: tuple[int, ...], global_blocks: tuple[int, ...],
           window_spec: tuple[int, ...] = (8, 4, 14, 7), bkg: tuple[int, int] = (7, 7)) -> dict[str, Any]:
    return dict(img_size=1024, embed_dim=embed_dim, num_heads=heads, stages=stages,
                global_att_blocks=global_blocks, window_spec=window_spec,
                window_pos_embed_bkg_spatial_size=bkg)


_HIERA = {  # short name, file-name size, description size, trunk
    "t": ("tiny", "tiny", _hiera(96, 1, (1, 2, 7, 2), (5, 7, 9))),
    "s": ("small", "small", _hiera(96, 1, (1, 2, 11, 2), (7, 10, 13))),
    "b": ("base_plus", "base+", _hiera(112, 2, (2, 3, 16, 3), (12, 16, 20), bkg=(14, 14))),
    "l": ("large", "large", _hiera(144, 2, (2, 6, 36, 4), (23, 33, 43), window_spec=(8, 4, 16, 8))),
}
_META2 = {"2": "https://dl.fbaipublicfiles.com/segment_anything_2/072824/",
          "2.1": "https://dl.fbaipublicfiles.com/segment_anything_2/092824/"}


def _sam2_configs() -> list[ModelConfig]:
    out = []
    for version in ("2", "2.1"):
        for short, (size, label, trunk) in _HIERA.items():
            name, official = f"sam{version}_{short}", f"sam{version}_hiera_{size}.pt"
            config_style = f"sam{version}_hiera_{'b+' if short == 'b' else short}.pt"  # Meta's yaml names
            aliases = (f"{name}.pt", official, config_style)
            out.append(ModelConfig(
                name, "sam2", dict(encoder=dict(trunk), version=version, **SAM2_HEADS),
                aliases=aliases,
                weights=WeightsFile(official, _META2[version] + official),
                description=f"SAM {version} Hiera-{label} (Meta)",
            ))
    return out


MODELS.update((cfg.name, cfg) for cfg in _sam2_configs())


def find_config(name: str) -> ModelConfig | None:
    """The registry entry for a model name (``sam_b``) or a file name a user types (``sam_b.pt``)."""
    key = name.strip()
    if key in MODELS:
        return MODELS[key]
    for cfg in MODELS.values():
        if key in cfg.aliases:
            return cfg
    return None


def _decoder_parts(p: dict[str, Any], embedding_grid: int, img_size: int) -> tuple[PromptEncoder, MaskDecoder]:
    dim = p["prompt_embed_dim"]
    prompt_encoder = PromptEncoder(
        embed_dim=dim,
        image_embedding_size=(embedding_grid, embedding_grid),
        input_image_size=(img_size, img_size),
        mask_in_chans=p["mask_in_chans"],
    )
    mask_decoder = MaskDecoder(
        transformer_dim=dim,
        transformer=TwoWayTransformer(
            depth=p["decoder_depth"], embedding_dim=dim, num_heads=p["decoder_heads"], mlp_dim=p["decoder_mlp_dim"]
        ),
        num_multimask_outputs=p["num_multimask_outputs"],
        iou_head_depth=p["iou_head_depth"],
        iou_head_hidden_dim=p["iou_head_hidden_dim"],
    )
    return prompt_encoder, mask_decoder


def build_sam_vit(params: dict[str, Any]) -> Sam:
    """SAM with a ViT image encoder (B/L/H or any custom size)."""
    enc = dict(params["encoder"])
    encoder = ImageEncoderViT(out_chans=params["prompt_embed_dim"], **enc)
    grid = enc["img_size"] // enc["patch_size"]
    return Sam(encoder, *_decoder_parts(params, grid, enc["img_size"]))


def build_mobile_sam(params: dict[str, Any]) -> Sam:
    """SAM with MobileSAM's TinyViT image encoder."""
    from .tiny_vit import TinyViT

    enc = dict(params["encoder"])
    encoder = TinyViT(out_chans=params["prompt_embed_dim"], **enc)
    return Sam(encoder, *_decoder_parts(params, enc["img_size"] // 16, enc["img_size"]))


def build_sam2(params: dict[str, Any]) -> nn.Module:
    """SAM 2 / SAM 2.1 with a Hiera image encoder (official or custom sizes)."""
    from .hiera import Hiera
    from .sam2 import Sam2
    from .sam2_decoder import Sam2MaskDecoder, Sam2PromptEncoder, sam2_two_way_transformer
    from .sam2_memory import MemoryAttention, MemoryEncoder
    from .sam2_neck import FpnNeck, Sam2ImageEncoder

    enc = dict(params["encoder"])
    img_size = enc.pop("img_size")
    d_model, mem_dim = params["d_model"], params["mem_dim"]
    trunk = Hiera(**enc)
    neck = FpnNeck(d_model, trunk.channel_list, fpn_top_down_levels=(2, 3), fpn_interp_model="nearest")
    grid = img_size // 16  # stride of the lowest level kept (scalp=1 drops the stride-32 one)
    prompt_encoder = Sam2PromptEncoder(d_model, (grid, grid), (img_size, img_size), mask_in_chans=16)
    mask_decoder = Sam2MaskDecoder(d_model, sam2_two_way_transformer(2, d_model, 8, 2048))
    is_2_1 = str(params["version"]) == "2.1"
    return Sam2(
        Sam2ImageEncoder(trunk, neck, img_size=img_size, scalp=1),
        prompt_encoder,
        mask_decoder,
        MemoryAttention(d_model, params["memory_layers"], mem_dim, feat_sizes=(grid, grid)),
        MemoryEncoder(mem_dim, d_model),
        num_maskmem=params["num_maskmem"],
        mem_dim=mem_dim,
        no_obj_embed_spatial=is_2_1,
        proj_tpos_enc_in_obj_ptrs=is_2_1,
    )


BUILDERS: dict[str, Callable[[dict[str, Any]], nn.Module]] = {
    "sam_vit": build_sam_vit,
    "mobile_sam": build_mobile_sam,
    "sam2": build_sam2,
}


def build_model(config: ModelConfig | str) -> nn.Module:
    """A model with freshly initialised weights, in eval mode, from a config or a registry name."""
    if isinstance(config, str):
        found = find_config(config)
        if found is None:
            raise KeyError(f"unknown model {config!r}; known: {', '.join(MODELS)}")
        config = found
    return BUILDERS[config.family](config.params).eval()
