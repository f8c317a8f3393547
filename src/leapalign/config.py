"""Typed configuration: YAML presets under configs/, overridden by `--set section.key=value`.

The objective and optimiser defaults are the LeapAlign paper's (or generic where it has none: LoRA at
1e-4); the world keys (model.path, resolution, prompt sets, reward) default to the embedded ShapeWorld
so that a run works offline, and a run on another model names those left at ShapeWorld's values.
ShapeWorld's tuned settings are its preset, configs/shapeworld_leapalign.yaml (= `leapalign demo`).

Sections: model, method, reward, train, eval, output.  Unknown keys are an error naming the
closest valid key.  `method` holds `name` plus the options of that method (its dataclass fields).
"""
from __future__ import annotations

import dataclasses
import difflib
import typing
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from .errors import UserError
from .methods import build_method
from .rewards import default_hinge
from .values import coerce, parse_scalar


@dataclass
class ModelConfig:
    path: str = "shapeworld"  # a diffusers folder or hub id; "shapeworld" = the shipped base
    height: int = 32
    width: int = 32
    # FLUX.1-dev: the distilled guidance embedding (default 3.5); SD3 / Qwen-Image: real
    # classifier-free guidance in every velocity (defaults 7.0 / 4.0); None = the family's default
    guidance_scale: float | None = None
    negative_prompt: str = ""  # the unconditional prompt of real CFG
    # real CFG: the unconditional branch without gradient in steps that carry it (half the activations);
    # None = the family's reference default (FLUX.2 klein true, SD3 and Qwen-Image false)
    detach_uncond: bool | None = None
    max_sequence_length: int | None = None  # T5 tokens; None = the pipeline's default (FLUX 512, SD3 256)
    # the transformer's attention kernel through diffusers' dispatcher: "flash" (flash-attn), "_native_cudnn",
    # "_native_flash", "sage", ... (diffusers' AttentionBackendName); None = diffusers' default, torch SDPA
    attention_backend: str | None = None
    dtype: str = "float32"  # float32 | bfloat16 | float16


@dataclass
class RewardConfig:
    # a built-in name, "module.path:callable", "path/to/file.py:callable", or weights of several:
    # {hpsv2.1: 1.0, pickscore: 0.5} (each component is logged as reward/<name>)
    fn: str | dict[str, float] = "shapematch"
    # hinge: loss = max(0, lam - reward) * scale; None = the built-in reward's own (rewards.HINGE: the paper's
    # margin on that reward's scale); a user's reward or a weighted sum must set lam
    lam: float | None = None
    scale: float | None = None
    path: str | None = None  # weights folder of a built-in reward (default: the shipped one)
    # rescale every sample's reward gradient to the batch's mean norm, so that a few samples with steep
    # gradients (a blank canvas) do not set the direction of every step; the step keeps its size
    balance: bool = False


@dataclass
class TrainConfig:
    steps: int = 300  # paper: 300 iterations
    batch_size: int = 16  # per process (paper: 64 in all)
    num_steps: int = 25  # rollout length (paper: 25)
    prompts: str = "shapeworld:train"  # "shapeworld:train|eval" or a text file, one prompt a line
    anchor: float = 0.0  # velocity anchor beta * ||v - v_base||^2 at one rollout state per step: a brake on reward hacking; 0 = off
    balance_tags: bool = True  # draw a task tag uniformly, then a prompt of it (prompt sets with tags)
    finetune: str = "lora"  # lora | full
    lora_rank: int = 8
    lora_alpha: float = 8.0
    lora_targets: list[str] = field(default_factory=lambda: ["to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out"])
    lr: float | None = None  # None: 1e-5 for full fine-tuning (paper), 1e-4 for LoRA
    offload_optimizer: bool = False  # fp32 masters, optimiser states and EMA in CPU memory; the GPU keeps weights and gradients
    optimizer: str = "adamw"  # adamw | adamw8bit (bitsandbytes: moments in 8 bits, 2 bytes a parameter instead of 8)
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    weight_decay: float = 1e-4
    grad_clip: float = 1.0
    grad_accum: int = 1
    ema: float | None = 0.995  # evaluate and save an exponential moving average of the weights (paper); None = off
    seed: int = 0
    save_every: int = 0  # checkpoint interval in steps; 0 = only at the end
    keep_last_n: int = 0  # checkpoints kept on disk (the newest ones); 0 = all
    max_bad_steps: int = 5  # non-finite reward/loss/gradient steps in a row before the run stops
    text_cache: str = "device"  # device | cpu: text encoders and prompt cache in CPU memory, each batch moved to the device
    decode_batch: int = 0  # decode and score the rollout's samples this many at a time; 0 = all at once
    fp32_master: bool = True  # with model.dtype bf16/fp16: the optimiser updates fp32 copies of the trainable weights
    gradient_checkpointing: bool = False  # recompute transformer blocks in backward: less memory, ~30% more time
    vae_checkpointing: bool = False  # recompute the VAE decoder's blocks in the reward gradient's backward (its activations lead at 1024 px)
    compile: bool = False  # torch.compile the transformer (rollout and training calls): compiles once, then faster steps
    reuse_rollout_calls: bool = True  # the rollout keeps the model calls the surrogates back-propagate (a forward saved each; held to the backward, checkpointed ones as inputs)
    parallel: str = "ddp"  # with several processes: ddp (every rank holds the model) | fsdp (blocks sharded, FSDP2)
    fsdp_cpu_offload: bool = False  # fsdp: keep parameter shards in CPU memory between uses
    fsdp_reshard: bool = True  # fsdp: free gathered weights after each forward (ZeRO-3); false keeps them to backward (ZeRO-2)


@dataclass
class EvalConfig:
    prompts: str = "shapeworld:eval"
    num_images: int = 0  # 0 = one image per prompt row
    num_steps: int = 28  # FluxPipeline's default
    batch_size: int = 16
    every: int = 100  # also evaluate every N steps (summary.json "during", tensorboard eval/*); 0 = before and after only
    # never trained on, evaluated with the reward: checkers (shapeeval) or any reward name; None = the prompt set's
    # defaults (ShapeWorld: shapeeval, shapescore), [] = none
    judges: list[str] | None = None
    hack_margin: float = 0.02  # warn when the held-out reward keeps rising while a judge falls by more than this
    stop_on_hack: bool = False  # ... and then stop, keeping the weights of the evaluation where the first judge was best
    grid_size: int = 24  # images in the before/after sample grids


@dataclass
class OutputConfig:
    dir: str = "runs/leapalign"
    tensorboard: bool = True
    overwrite: bool = False


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    method: dict = field(default_factory=lambda: {"name": "leapalign"})
    reward: RewardConfig = field(default_factory=RewardConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    output: OutputConfig = field(default_factory=OutputConfig)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def validate(self) -> None:
        """Every enum and range, checked once before anything loads; one line naming the key otherwise."""
        m, tc, ec = self.model, self.train, self.eval
        choices = {"model.dtype": (m.dtype, ("float32", "bfloat16", "float16")), "train.finetune": (tc.finetune, ("lora", "full")),
                   "train.parallel": (tc.parallel, ("ddp", "fsdp")), "train.text_cache": (tc.text_cache, ("device", "cpu")),
                   "train.optimizer": (tc.optimizer, ("adamw", "adamw8bit"))}
        for key, (value, allowed) in choices.items():
            if value not in allowed:
                raise UserError(f"{key} must be one of {', '.join(allowed)}, got {value!r}")
        at_least = {"train.steps": (tc.steps, 1), "train.batch_size": (tc.batch_size, 1), "train.grad_accum": (tc.grad_accum, 1),
                    "train.num_steps": (tc.num_steps, 2), "train.lora_rank": (tc.lora_rank, 1), "eval.num_steps": (ec.num_steps, 1),
                    "eval.batch_size": (ec.batch_size, 1), "model.height": (m.height, 1), "model.width": (m.width, 1)}
        for key, (value, low) in at_least.items():
            if value < low:
                why = " so that a method has two steps to choose from" if key == "train.num_steps" else ""
                raise UserError(f"{key} must be >= {low}{why}, got {value}")
        for key, value in (("train.anchor", tc.anchor), ("train.save_every", tc.save_every), ("train.keep_last_n", tc.keep_last_n),
                           ("train.decode_batch", tc.decode_batch), ("eval.every", ec.every), ("eval.num_images", ec.num_images),
                           ("eval.hack_margin", ec.hack_margin), ("train.weight_decay", tc.weight_decay)):
            if value < 0:
                raise UserError(f"{key} must be >= 0 (0 = off), got {value}")
        if tc.lr is not None and not tc.lr > 0:
            raise UserError(f"train.lr must be positive, got {tc.lr}")
        if tc.ema is not None and not 0 < tc.ema < 1:
            raise UserError(f"train.ema must be in (0, 1) or null (off), got {tc.ema}")
        if tc.offload_optimizer and tc.parallel == "fsdp":
            raise UserError("train.offload_optimizer is for one GPU or ddp; with train.parallel=fsdp use train.fsdp_cpu_offload")
        if tc.compile and tc.parallel == "fsdp":
            raise UserError("train.compile is not combined with train.parallel=fsdp here (the sharded blocks would need compiling "
                            "one by one); use train.parallel=ddp or train.compile=false")
        if tc.optimizer == "adamw8bit" and tc.parallel == "fsdp":
            raise UserError("train.optimizer=adamw8bit (bitsandbytes) cannot hold sharded parameters; use it with train.parallel=ddp "
                            "or one process, or train.optimizer=adamw with fsdp")
        if tc.anchor > 0 and tc.finetune == "full" and tc.parallel == "fsdp":
            raise UserError("train.anchor with train.finetune=full keeps a whole frozen copy of the transformer on every rank, "
                            "which defeats train.parallel=fsdp; use train.finetune=lora (its base is the model with the LoRA off) or train.anchor=0")


SECTIONS = {f.name: f for f in dataclasses.fields(Config)}
# keys that no longer exist: an old config that sets one is told why, once, and runs
REMOVED = {"output.log_every": "every step is written to metrics.jsonl and tensorboard; output.log_every is ignored"}


def _closest(key: str, valid: list[str]) -> str:
    hit = difflib.get_close_matches(key, valid, n=1, cutoff=0.0)
    return f"; did you mean '{hit[0]}'?" if hit else ""


def build(data: dict) -> Config:
    """Config from a nested dict, with every key and type checked."""
    cfg = Config()
    if not isinstance(data, dict):
        raise UserError("the config file must be a YAML mapping of sections (model, method, reward, train, eval, output)")
    for section, values in data.items():
        if section not in SECTIONS:
            raise UserError(f"unknown config section '{section}'{_closest(section, list(SECTIONS))}")
        if values is None:
            continue
        if not isinstance(values, dict):
            raise UserError(f"config section '{section}' must be a mapping of keys to values")
        if section == "method":
            # another method starts from its own defaults, not from the default method's options
            same = values.get("name", cfg.method["name"]) == cfg.method["name"]
            cfg.method = {**cfg.method, **values} if same else dict(values)
            continue
        obj = getattr(cfg, section)
        fields = {f.name: f for f in dataclasses.fields(obj)}
        hints = typing.get_type_hints(type(obj))
        for key, value in values.items():
            if f"{section}.{key}" in REMOVED:
                warnings.warn(REMOVED[f"{section}.{key}"])
                continue
            if key not in fields:
                raise UserError(f"unknown config key '{section}.{key}'{_closest(key, [f'{k}' for k in fields])}")
            setattr(obj, key, coerce(value, hints[key], f"{section}.{key}"))
    cfg.method = build_method(cfg.method, typed_options=True)  # validates the method's name and options now, before any work
    return resolve(cfg)


def resolve(cfg: Config) -> Config:
    """Check the config (validate) and fill the defaults that depend on other keys: the reward's own hinge
    (reward.lam, reward.scale) and the learning rate of the fine-tuning kind.  Idempotent."""
    cfg.validate()
    hinge = default_hinge(cfg.reward.fn)
    if cfg.reward.lam is None:
        if hinge is None:
            raise UserError(f"reward.lam is not set and reward.fn {cfg.reward.fn!r} is not a built-in, so its scale is unknown; set "
                            "reward.lam, the hinge margin max(0, lam - reward), above the rewards training should raise")
        cfg.reward.lam = hinge[0]
    if cfg.reward.scale is None:
        cfg.reward.scale = hinge[1] if hinge is not None else 1.0
    if cfg.train.lr is None:
        cfg.train.lr = DEFAULT_LR[cfg.train.finetune]
    return cfg


DEFAULT_LR = {"full": 1e-5, "lora": 1e-4}  # the paper's full fine-tuning lr; LoRA's common one (diffusers' FLUX examples)
# the keys whose defaults are ShapeWorld's (the world a run is in): a run on another model lists those it kept
WORLD_KEYS = ("model.height", "model.width", "train.prompts", "eval.prompts", "reward.fn")


def _value(cfg: Config, dotted: str):
    section, key = dotted.split(".")
    return getattr(getattr(cfg, section), key)


def world_notes(cfg: Config) -> list[str]:
    """First lines for a run on a model other than ShapeWorld: ShapeWorld's values it kept, and an anchor the paper lacks."""
    if cfg.model.path == Config().model.path:
        return []
    kept = [f"{k}={_value(cfg, k)}" for k in WORLD_KEYS if _value(cfg, k) == _value(Config(), k)]
    notes = [f"note: {', '.join(kept)} are ShapeWorld's values, not this model's; set them for {cfg.model.path}"] if kept else []
    if cfg.train.anchor > 0:
        notes.append(f"note: train.anchor = {cfg.train.anchor:g} adds a velocity anchor to the base, which the LeapAlign paper "
                     "does not use (its objective is the reward hinge alone); set train.anchor=0 for the paper's objective")
    return notes


def load(path: str | Path | None = None, overrides: list[str] | None = None) -> Config:
    """Read a YAML config (or the defaults) and apply `section.key=value` overrides."""
    data: dict = {}
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise UserError(f"config file {p} does not exist; presets live in configs/ (e.g. configs/shapeworld_leapalign.yaml)")
        try:
            data = yaml.safe_load(p.read_text()) or {}
        except yaml.YAMLError as e:
            raise UserError(f"config file {p} is not valid YAML: {str(e).splitlines()[0]}") from None
    new_name = [i.split("=", 1)[1] for i in overrides or [] if i.split("=", 1)[0].strip() == "method.name"]
    if new_name and isinstance(data.get("method"), dict) and data["method"].get("name", "leapalign") != new_name[-1]:
        data["method"] = {}  # switching method: the file's options belong to the other method
    for item in overrides or []:
        if "=" not in item or "." not in item.split("=", 1)[0]:
            raise UserError(f"--set expects section.key=value, got {item!r}")
        dotted, value = item.split("=", 1)
        section, key = dotted.split(".", 1)
        data.setdefault(section, {})
        if not isinstance(data[section], dict):
            raise UserError(f"config section '{section}' must be a mapping")
        data[section][key] = parse_scalar(value)
    return build(data)


def dump(cfg: Config) -> str:
    return yaml.safe_dump(cfg.to_dict(), sort_keys=False)
