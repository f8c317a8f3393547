"""The tiny diffusers/transformers components of the ShapeWorld FLUX pipeline, built from configs.

Why these choices (see docs/shapeworld.md for the measurements):
- VAE: 32x32x3 images <-> 8x8x8 latents (6x fewer numbers), so the transformer sees 16 tokens.
- Text encoder 2 (the "T5" slot) is a two-layer `T5EncoderModel` whose relative-position bias
  makes it causal and local: a token sees itself and the `T5_WINDOW - 1` tokens before it.
  FLUX gives every text token the same position, so the transformer reads the T5 stream as a
  bag of words; only contextual embeddings can tell it which colour belongs to which shape and
  which object is the relation's subject (a zero-layer T5, shipped first, left that to CLIP's
  one pooled vector, and the base could not bind colours or relations).  The window keeps every
  padding row past the prompt's receptive field equal (to float rounding), which lets training
  (and the leapalign adapter) merge the ~490 padding tokens of the pipeline's default
  `max_sequence_length=512` into one token with a log-count attention bias.
- Both text encoders are trained jointly with the transformer (frozen random encoders gave
  the transformer nothing to bind colours to shapes with).
"""
from __future__ import annotations

import torch

from . import world

CLIP_MAX_LENGTH = 16
T5_MAX_LENGTH = 512  # FluxPipeline's default max_sequence_length
T5_LAYERS = 2
T5_WINDOW = 5  # a T5 token attends to itself and the 4 tokens before it (exact buckets: at most 8)
T5_CONTENT_LENGTH = 32  # positions pretraining computes; the prompt plus the receptive field fit in it
_MASKED = -1.0e4  # relative-position bias of the positions a token does not see (exp underflows to 0, fp16-safe)
TEXT_DIM = 64

VAE_CONFIG = dict(
    in_channels=3,
    out_channels=3,
    down_block_types=("DownEncoderBlock2D",) * 3,
    up_block_types=("UpDecoderBlock2D",) * 3,
    block_out_channels=(16, 32, 64),
    layers_per_block=1,
    latent_channels=8,
    norm_num_groups=8,
    mid_block_add_attention=False,
    sample_size=32,
)

TRANSFORMER_CONFIG = dict(
    patch_size=1,
    in_channels=32,  # 8 latent channels x 2x2 packing
    out_channels=None,
    num_layers=2,
    num_single_layers=4,
    attention_head_dim=32,
    num_attention_heads=4,
    joint_attention_dim=TEXT_DIM,
    pooled_projection_dim=TEXT_DIM,
    guidance_embeds=False,
    axes_dims_rope=(8, 12, 12),
)

SCHEDULER_CONFIG = dict(
    num_train_timesteps=1000,
    shift=1.0,
    use_dynamic_shifting=True,
    base_shift=0.5,
    max_shift=1.15,
    base_image_seq_len=16,
    max_image_seq_len=256,
)


def _apply_merges(toks: list[str], merges: list[tuple[str, str]]) -> list[str]:
    rank = {m: i for i, m in enumerate(merges)}
    while len(toks) > 1:
        pairs = [(rank.get((a, b), len(rank)), i) for i, (a, b) in enumerate(zip(toks, toks[1:]))]
        r, i = min(pairs)
        if r == len(rank):
            break
        toks = toks[:i] + [toks[i] + toks[i + 1]] + toks[i + 2 :]
    return toks


def make_tokenizers():
    """A CLIP BPE tokenizer whose every grammar word is one token, and a T5 unigram tokenizer."""
    from transformers import CLIPTokenizer, T5TokenizerFast

    words = world.vocabulary()
    vocab: dict[str, int] = {}

    def add(token: str) -> None:
        vocab.setdefault(token, len(vocab))

    for c in "abcdefghijklmnopqrstuvwxyz":  # letters keep unknown words representable
        add(c)
        add(c + "</w>")
    merges: list[tuple[str, str]] = []
    for word in words:
        # tokenise with the merges so far, then merge what is left left-to-right; later merges
        # never fire on earlier words, whose own chains always hold a lower-ranked pair
        toks = _apply_merges(list(word[:-1]) + [word[-1] + "</w>"], merges)
        while len(toks) > 1:
            merges.append((toks[0], toks[1]))
            toks = [toks[0] + toks[1]] + toks[2:]
            add(toks[0])
    add("<|startoftext|>")
    add("<|endoftext|>")
    clip_tok = CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=CLIP_MAX_LENGTH)

    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0)] + [("\u2581" + w, -1.0) for w in words]
    t5_tok = T5TokenizerFast(vocab=pieces, extra_ids=0, model_max_length=T5_MAX_LENGTH)
    return clip_tok, t5_tok


def make_text_encoders(clip_tok, t5_tok, width: int = TEXT_DIM, clip_layers: int = 2, t5_layers: int = T5_LAYERS, heads: int = 4,
                       ff_mult: int = 4, clip_length: int = CLIP_MAX_LENGTH, t5_window: int | None = T5_WINDOW):
    """The base's CLIP-L and T5 slots at toy size (the defaults are the shipped base's; `t5_window=None`: a plain
    bidirectional T5, whose padding rows all differ, as T5-XXL's do)."""
    from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel

    clip = CLIPTextModel(
        CLIPTextConfig(
            vocab_size=len(clip_tok),
            hidden_size=width,
            intermediate_size=ff_mult * width,
            num_hidden_layers=clip_layers,
            num_attention_heads=heads,
            max_position_embeddings=clip_length,
            bos_token_id=clip_tok.bos_token_id,
            eos_token_id=clip_tok.eos_token_id,
            pad_token_id=clip_tok.pad_token_id,
            projection_dim=width,
        )
    )
    t5 = T5EncoderModel(
        T5Config(
            vocab_size=len(t5_tok),
            d_model=width,
            d_kv=16,
            d_ff=ff_mult * width,
            num_layers=t5_layers,
            num_heads=heads,
            pad_token_id=t5_tok.pad_token_id,
            eos_token_id=t5_tok.eos_token_id,
            decoder_start_token_id=t5_tok.pad_token_id,
            dropout_rate=0.0,
        )
    )
    return clip, (window_t5_attention(t5, t5_window) if t5_window else t5)


def window_t5_attention(t5, window: int = T5_WINDOW):
    """Make a T5 encoder causal and local through its relative-position bias (see the module docstring).

    The buckets of past distances >= `window` and of every future position get a bias that no
    softmax weight survives; their gradient is then exactly zero, so training keeps them.
    """
    if not t5.config.num_layers:
        return t5
    half = t5.config.relative_attention_num_buckets // 2
    if not 1 <= window <= half // 2:
        raise ValueError(f"the T5 window must be 1 to {half // 2} tokens (the exact buckets), got {window}")
    bias = t5.encoder.block[0].layer[0].SelfAttention.relative_attention_bias
    with torch.no_grad():
        bias.weight[window:] = _MASKED  # buckets 0..half-1: the past by distance, half..: the future
    return t5


def grow_t5(t5, layers: int = T5_LAYERS, window: int = T5_WINDOW):
    """`t5` with `layers` encoder layers, the new ones initialised as the identity (zero output projections)."""
    from transformers import T5EncoderModel

    if t5.config.num_layers >= layers:
        return t5
    config = t5.config.to_dict()
    config.update(num_layers=layers)
    grown = T5EncoderModel(type(t5.config).from_dict(config))
    missing, unexpected = grown.load_state_dict(t5.state_dict(), strict=False)
    new = {f"encoder.block.{i}." for i in range(t5.config.num_layers, layers)}
    if unexpected or any(not any(k.startswith(n) for n in new) for k in missing):
        raise RuntimeError(f"unexpected weights when adding T5 layers: {unexpected or missing}")
    with torch.no_grad():
        for block in grown.encoder.block[t5.config.num_layers:]:
            block.layer[0].SelfAttention.o.weight.zero_()
            block.layer[1].DenseReluDense.wo.weight.zero_()
    return window_t5_attention(grown, window)


def t5_window(t5) -> int | None:
    """The window `window_t5_attention` gave this encoder, read from its bias (None: not windowed).

    Read from the weights, not assumed, since the window is not part of the T5 config; weight
    decay shrinks the masked buckets a little, so a bucket counts as masked below half of _MASKED.
    """
    if not t5.config.num_layers:
        return None
    masked = (t5.encoder.block[0].layer[0].SelfAttention.relative_attention_bias.weight < _MASKED / 2).all(1)
    half = masked.numel() // 2
    if not masked[half:].all():
        return None
    open_ = (~masked[:half]).nonzero()
    window = int(open_.max()) + 1 if open_.numel() else 0
    return window if window and masked[window:half].all() else None


def encode_t5(t5, ids: torch.Tensor) -> torch.Tensor:
    """The T5 slot's output for padded ids (B, T), computed on the first T5_CONTENT_LENGTH positions.

    Exact for the windowed encoder: each row depends only on the `layers x (window - 1)` ids
    before it, so every row past the prompt plus that receptive field is the last computed one.
    An encoder that is not windowed is computed on every position.
    """
    window = t5_window(t5)
    if window is None:
        return t5(ids).last_hidden_state
    n = min(T5_CONTENT_LENGTH, ids.shape[1])
    reach = t5.config.num_layers * (window - 1) + 1
    if (ids[:, n - reach :] != t5.config.pad_token_id).any():
        raise ValueError(f"a prompt is too long for the first {n} T5 positions; raise T5_CONTENT_LENGTH")
    head = t5(ids[:, :n]).last_hidden_state
    return torch.cat([head, head[:, -1:].expand(-1, ids.shape[1] - n, -1)], 1)


def make_vae():
    from diffusers import AutoencoderKL

    return AutoencoderKL(**VAE_CONFIG)


def make_transformer():
    from diffusers import FluxTransformer2DModel

    return FluxTransformer2DModel(**TRANSFORMER_CONFIG)


def make_scheduler():
    from diffusers import FlowMatchEulerDiscreteScheduler

    return FlowMatchEulerDiscreteScheduler(**SCHEDULER_CONFIG)
