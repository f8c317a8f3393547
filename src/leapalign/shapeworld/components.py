"""The tiny diffusers/transformers components of the ShapeWorld FLUX pipeline, built from configs.

Why these choices (see docs/shapeworld.md for the measurements):
- VAE: 32x32x3 images <-> 8x8x8 latents (6x fewer numbers), so the transformer sees 16 tokens.
- Text encoder 2 (the "T5" slot) is a `T5EncoderModel` with zero layers: a learned word
  embedding plus RMSNorm.  Its padding rows are then identical, which lets training (and the
  leapalign adapter) merge the 500 padding tokens of the pipeline's default
  `max_sequence_length=512` into one token with a log-count attention bias, exactly.
  Word order reaches the model through the CLIP text encoder's pooled vector, as in FLUX.
- Both text encoders are trained jointly with the transformer (frozen random encoders gave
  the transformer nothing to bind colours to shapes with).
"""
from __future__ import annotations

from . import world

CLIP_MAX_LENGTH = 16
T5_MAX_LENGTH = 512  # FluxPipeline's default max_sequence_length
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


def make_text_encoders(clip_tok, t5_tok, width: int = TEXT_DIM, clip_layers: int = 2, t5_layers: int = 0, heads: int = 4,
                       ff_mult: int = 4, clip_length: int = CLIP_MAX_LENGTH):
    """The base's CLIP-L and T5 slots at toy size (the defaults are the shipped base's: a zero-layer T5)."""
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
    return clip, t5


def make_vae():
    from diffusers import AutoencoderKL

    return AutoencoderKL(**VAE_CONFIG)


def make_transformer():
    from diffusers import FluxTransformer2DModel

    return FluxTransformer2DModel(**TRANSFORMER_CONFIG)


def make_scheduler():
    from diffusers import FlowMatchEulerDiscreteScheduler

    return FlowMatchEulerDiscreteScheduler(**SCHEDULER_CONFIG)
