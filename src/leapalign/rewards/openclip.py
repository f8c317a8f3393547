"""open_clip CLIP checkpoints (HPSv2, HPSv2.1, ...) as a `transformers.CLIPModel`, without open_clip.

open_clip's ViT CLIP and transformers' CLIP compute the same function: a class-token ViT
(conv patchify, class token, positional embedding, ln_pre, pre-norm blocks, ln_post on the class
token, projection) and a causal text transformer pooled at the end-of-text token. Only the names
and layouts differ: open_clip keeps q/k/v in one `in_proj_weight` (nn.MultiheadAttention) and its
projections as (width, embed) matrices used as `x @ proj`, where transformers has Linear layers.

Text pooling: open_clip takes the features at `argmax(token ids)` (the end-of-text token has the
highest id, 49407, in the CLIP BPE). `openclip_config` sets `eos_token_id = vocab_size - 1`, so
transformers pools at the first end-of-text token, which is the same position for any tokenizer
whose end-of-text id is the highest id (the OpenAI / laion CLIP tokenizer is).
"""
from __future__ import annotations

import math

import torch

# Vision widths whose open_clip head width is not 64: ViT-H (80), ViT-g (88), ViT-bigG (104).
_VISION_HEADS = {1280: 16, 1408: 16, 1664: 16}


def _strip(state_dict: dict) -> dict:
    """Drop a DistributedDataParallel 'module.' prefix and non-weight entries."""
    out = {}
    for k, v in state_dict.items():
        k = k[len("module."):] if k.startswith("module.") else k
        if k != "attn_mask" and isinstance(v, torch.Tensor):
            out[k] = v
    return out


def _layers(sd: dict, prefix: str) -> int:
    return len({k[len(prefix):].split(".")[0] for k in sd if k.startswith(prefix)})


def openclip_config(state_dict: dict, vision_heads: int | None = None, text_heads: int | None = None,
                    hidden_act: str = "gelu"):
    """A `CLIPConfig` read off an open_clip ViT state dict's shapes.

    Head counts are not in the shapes: by default text heads = width / 64 (every open_clip CLIP
    text tower) and vision heads = width / 64, or 16 for ViT-H/g/bigG. `hidden_act`: "gelu" for
    laion/open_clip-trained models (ViT-H-14, HPSv2), "quick_gelu" for OpenAI-trained ones.
    """
    from transformers import CLIPConfig

    sd = _strip(state_dict)
    vw, _, patch, _ = sd["visual.conv1.weight"].shape
    n_pos = sd["visual.positional_embedding"].shape[0]
    grid = math.isqrt(n_pos - 1)
    if grid * grid + 1 != n_pos:
        raise ValueError(f"visual.positional_embedding has {n_pos} rows: not a square grid plus a class token")
    embed = sd["visual.proj"].shape[1]
    tw = sd["ln_final.weight"].shape[0]
    ctx, vocab = sd["positional_embedding"].shape[0], sd["token_embedding.weight"].shape[0]
    vision = dict(hidden_size=vw, intermediate_size=sd["visual.transformer.resblocks.0.mlp.c_fc.weight"].shape[0],
                  num_hidden_layers=_layers(sd, "visual.transformer.resblocks."),
                  num_attention_heads=vision_heads or _VISION_HEADS.get(vw, vw // 64),
                  image_size=grid * patch, patch_size=patch, hidden_act=hidden_act, projection_dim=embed)
    text = dict(vocab_size=vocab, hidden_size=tw, intermediate_size=sd["transformer.resblocks.0.mlp.c_fc.weight"].shape[0],
                num_hidden_layers=_layers(sd, "transformer.resblocks."), num_attention_heads=text_heads or tw // 64,
                max_position_embeddings=ctx, hidden_act=hidden_act, projection_dim=embed,
                bos_token_id=vocab - 2, eos_token_id=vocab - 1, pad_token_id=vocab - 1)
    return CLIPConfig(text_config=text, vision_config=vision, projection_dim=embed)


def _blocks(sd: dict, src: str, dst: str, n: int, out: dict) -> None:
    for i in range(n):
        s, d = f"{src}.{i}.", f"{dst}.{i}."
        for kind in ("weight", "bias"):
            q, k, v = sd.pop(s + f"attn.in_proj_{kind}").chunk(3, dim=0)
            out[d + f"self_attn.q_proj.{kind}"], out[d + f"self_attn.k_proj.{kind}"], out[d + f"self_attn.v_proj.{kind}"] = q, k, v
            for a, b in (("attn.out_proj", "self_attn.out_proj"), ("ln_1", "layer_norm1"), ("ln_2", "layer_norm2"),
                         ("mlp.c_fc", "mlp.fc1"), ("mlp.c_proj", "mlp.fc2")):
                out[d + f"{b}.{kind}"] = sd.pop(s + f"{a}.{kind}")


def openclip_to_transformers(state_dict: dict, config) -> dict:
    """open_clip ViT CLIP state dict -> `transformers.CLIPModel` state dict (`config` from `openclip_config`).

    Raises ValueError naming any open_clip key it does not know (attention pooling, layer scale,
    an HF text tower, ...), so an unsupported variant never loads silently wrong.
    """
    sd = _strip(state_dict)
    out: dict[str, torch.Tensor] = {}
    V, T = "vision_model.", "text_model."
    out[V + "embeddings.patch_embedding.weight"] = sd.pop("visual.conv1.weight")
    out[V + "embeddings.class_embedding"] = sd.pop("visual.class_embedding")
    out[V + "embeddings.position_embedding.weight"] = sd.pop("visual.positional_embedding")
    for kind in ("weight", "bias"):
        out[V + f"pre_layrnorm.{kind}"] = sd.pop(f"visual.ln_pre.{kind}")  # sic: transformers' name
        out[V + f"post_layernorm.{kind}"] = sd.pop(f"visual.ln_post.{kind}")
        out[T + f"final_layer_norm.{kind}"] = sd.pop(f"ln_final.{kind}")
    _blocks(sd, "visual.transformer.resblocks", V + "encoder.layers", config.vision_config.num_hidden_layers, out)
    _blocks(sd, "transformer.resblocks", T + "encoder.layers", config.text_config.num_hidden_layers, out)
    out["visual_projection.weight"] = sd.pop("visual.proj").t().contiguous()
    out[T + "embeddings.token_embedding.weight"] = sd.pop("token_embedding.weight")
    out[T + "embeddings.position_embedding.weight"] = sd.pop("positional_embedding")
    if "text_projection.weight" in sd:  # newer open_clip may hold it as an nn.Linear
        out["text_projection.weight"] = sd.pop("text_projection.weight")
    else:
        out["text_projection.weight"] = sd.pop("text_projection").t().contiguous()
    out["logit_scale"] = sd.pop("logit_scale").reshape(())
    if sd:
        raise ValueError(f"open_clip keys with no transformers CLIP counterpart: {sorted(sd)[:8]}")
    return out


def load_openclip(state_dict: dict, **config_kwargs):
    """A `transformers.CLIPModel` holding an open_clip ViT CLIP state dict (strict: every weight is set)."""
    from transformers import CLIPModel

    config = openclip_config(state_dict, **config_kwargs)
    with torch.device("meta"):
        model = CLIPModel(config)
    model.load_state_dict(openclip_to_transformers(state_dict, config), strict=True, assign=True)
    for m in model.modules():  # non-persistent buffers were created on meta: rebuild them
        if hasattr(m, "position_ids"):
            m.position_ids = torch.arange(m.position_ids.shape[-1]).expand((1, -1))
    return model.eval()
