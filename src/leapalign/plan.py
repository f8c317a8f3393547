"""`leapalign plan`: one training iteration of a configuration traced at full size on fake tensors.

The pipeline is built from its architecture configs (a local folder's, or the published ones shipped in
`leapalign/archs/` for a hub id) under torch's FakeTensorMode: tensors carry shape, dtype and device, no memory
and no values.  `Run.train_step`, the trainer's own step, then runs once on it (rollout, decode and reward
gradient, surrogates, optimiser step with its states, EMA, LoRA or full, checkpointing, FSDP2 over N ranks through a
fake process group), while `MemoryTrace` follows every tensor storage that is created and freed, so its peak is
the step's peak, split by what the bytes hold, and FLOPs are counted per operator.

What a fake trace does not see: the CUDA caching allocator's rounding and fragmentation, the CUDA context and
kernels' workspaces, NCCL buffers (`CUDA_OVERHEAD` adds a fixed allowance); text is traced at its padded length.
"""
from __future__ import annotations

import contextlib
import json
import math
import weakref
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves, tree_map_only

from .errors import UserError

ARCHS = Path(__file__).parent / "archs"
GiB = 2**30
# What a CUDA process holds beyond its tensors: the context and cuBLAS / attention workspaces (measured
# values are 0.5-1 GiB on H100s); added to the traced peak before it is compared with a GPU's memory.
CUDA_OVERHEAD = int(1.0 * GiB)
# Dense peak throughput (TFLOP/s) per accelerator and compute dtype, from the vendors' data sheets (no sparsity).
ACCELERATORS = {
    "h100": {"bfloat16": 989.0, "float16": 989.0, "float32": 494.5},  # H100 SXM; float32 runs as TF32
    "h200": {"bfloat16": 989.0, "float16": 989.0, "float32": 494.5},
    "a100": {"bfloat16": 312.0, "float16": 312.0, "float32": 156.0},
    "l40s": {"bfloat16": 362.0, "float16": 362.0, "float32": 183.0},
    "b200": {"bfloat16": 2250.0, "float16": 2250.0, "float32": 1100.0},
}
CATEGORIES = ("trained weights", "frozen transformer", "frozen text encoders", "frozen vae", "frozen reward", "gradients",
              "optimizer states and masters", "activations and temporaries")
PROMPT_TOKENS = 64  # a prompt's length where a pipeline pads to the longest prompt, not to a fixed length


# ----------------------------------------------------------------------------------------------- tracing

class MemoryTrace(TorchDispatchMode):
    """Live bytes per category of every tensor storage made while active (and of those `label`led), and the peak.

    New storages count as the current phase's default category; `label` moves storages to another (weights,
    gradients, states).  Categories in `host` (offloaded states, CPU text encoders) live in CPU memory and are
    left out of the device total whose peak is kept.  Also: FLOPs of every operator torch's counter knows, the
    real value of every random draw from an explicit generator (the trainer's choices of steps and prompts), and a
    stand-in value for reading a fake number (a finite loss, a true check), so the trainer's own code runs.
    """

    def __init__(self, host: set[str] = frozenset()):
        super().__init__()
        from torch.utils.weak import WeakIdKeyDictionary

        self.storages = WeakIdKeyDictionary()
        self.bytes = defaultdict(int)
        self.host = set(host)
        self.device_total = self.peak = 0
        self.peak_bytes: dict[str, int] = {}
        self.peak_phase = self.phase = "load"
        self.phase_peaks: dict[str, int] = {}
        self.flops = 0
        self.default = "activations and temporaries"

    # storages ----------------------------------------------------------------------------
    def _move(self, info: list, category: str | None, nbytes: int) -> None:
        old_cat, old_n = info
        if old_cat is not None:
            self.bytes[old_cat] -= old_n
            if old_cat not in self.host:
                self.device_total -= old_n
        info[0], info[1] = category, nbytes
        if category is not None:
            self.bytes[category] += nbytes
            if category not in self.host:
                self.device_total += nbytes
                self._update_peak()

    def _update_peak(self) -> None:
        if self.device_total > self.phase_peaks.get(self.phase, -1):
            self.phase_peaks[self.phase] = self.device_total
        if self.device_total > self.peak:
            self.peak, self.peak_phase = self.device_total, self.phase
            self.peak_bytes = {k: v for k, v in self.bytes.items() if v and k not in self.host}

    def _storages(self, t: torch.Tensor):
        from torch.distributed._tools.common_utils import get_untyped_storages

        return get_untyped_storages(t)

    def track(self, t: torch.Tensor, category: str | None = None, relabel: bool = False) -> None:
        for st in self._storages(t):
            info = self.storages.get(st)
            if info is None:
                info = [None, 0]
                self.storages[st] = info
                weakref.finalize(st, self._move, info, None, 0)
                self._move(info, category or self.default, st.nbytes())
            elif relabel and category is not None and info[0] != category:
                self._move(info, category, info[1])

    def label(self, tensors, category: str) -> None:
        for t in tensors:
            if isinstance(t, torch.Tensor):
                self.track(t, category, relabel=True)

    @contextlib.contextmanager
    def in_phase(self, name: str, default: str = "activations and temporaries"):
        before = (self.phase, self.default)
        self.phase, self.default = name, default
        try:
            yield
        finally:
            self.phase, self.default = before

    def _resized(self, st, size: int) -> None:
        info = self.storages.get(st)
        if info is not None and info[0] is not None:
            self._move(info, info[0], size)

    def __enter__(self):
        self._resize = torch.UntypedStorage.resize_
        trace = self

        def resize_(st, size):  # FSDP2 frees and refills its gathered weights by resizing storages
            trace._resize(st, size)
            trace._resized(st, st.nbytes())

        torch.UntypedStorage.resize_ = resize_
        return super().__enter__()

    def __exit__(self, *args):
        torch.UntypedStorage.resize_ = self._resize
        return super().__exit__(*args)

    # operators -----------------------------------------------------------------------------
    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        from torch._subclasses.fake_tensor import FakeTensor, unset_fake_temporarily
        from torch.distributed.tensor import DTensor
        from torch.utils.flop_counter import flop_registry

        kwargs = kwargs or {}
        if any(t is DTensor for t in types):
            return NotImplemented  # let DTensor run its local operators, which this mode then sees
        if func is torch.ops.aten._local_scalar_dense.default and isinstance(args[0], FakeTensor):
            return _stand_in(args[0].dtype)
        if func in (torch.ops.aten.equal.default, torch.ops.aten.is_nonzero.default) and any(isinstance(a, FakeTensor) for a in args):
            return True
        if func is torch.ops._c10d_functional.wait_tensor.default and isinstance(args[0], FakeTensor):
            return args[0]  # the fake kernel returns a new tensor where the real one waits in place
        if func is torch.ops.aten.nonzero.default and isinstance(args[0], FakeTensor):
            return _all_nonzero(args[0])  # a mask's selection as if every entry were true: its largest size
        if func is torch.ops.aten.index.Tensor and any(isinstance(i, FakeTensor) and i.dtype == torch.bool for i in args[1]):
            indices = []
            for i in args[1]:
                indices += list(_all_nonzero(i).unbind(1)) if i is not None and i.dtype == torch.bool else [i]
            return self.__torch_dispatch__(func, types, (args[0], indices), kwargs)
        tensors = [a for a in tree_leaves((args, kwargs)) if isinstance(a, torch.Tensor)]
        if isinstance(kwargs.get("generator"), torch.Generator) or (tensors and not any(isinstance(t, FakeTensor) for t in tensors)):
            # a draw from the trainer's generators, or arithmetic on real tensors only (the draws, a small reward's
            # constants): real, so that the trainer's random choices are real numbers
            with unset_fake_temporarily():
                out = func(*args, **kwargs)
        else:
            out = func(*args, **kwargs)
        if func.overloadpacket in flop_registry:
            self.flops += flop_registry[func.overloadpacket](*args, **kwargs, out_val=out)
        tree_map_only(torch.Tensor, self.track, out)
        return out


def _all_nonzero(mask: torch.Tensor) -> torch.Tensor:
    return torch.zeros(mask.numel(), mask.dim(), dtype=torch.long, device=mask.device)


def _stand_in(dtype: torch.dtype):
    """The value a fake number reads as: finite, true, nonzero (a loss, a check, a norm); zero for integers."""
    if dtype == torch.bool:
        return True
    return 1.0 if dtype.is_floating_point else 0


class StubTokenizer:
    """Token ids of the length the pipeline asks for (padding to max_length), or PROMPT_TOKENS where it pads to the
    longest prompt: the planner needs shapes, not words, and ships no vocabularies."""

    def __init__(self, model_max_length: int):
        self.model_max_length = model_max_length
        self.padding_side = "right"
        self.added_tokens_encoder: dict = {}  # diffusers' textual-inversion check looks here

    def tokenize(self, text, **kwargs):
        return []

    def __call__(self, text, padding=None, max_length=None, truncation=None, return_tensors=None, **kwargs):
        from transformers import BatchEncoding

        n = len(text) if isinstance(text, (list, tuple)) else 1
        limit = max_length or self.model_max_length
        length = limit if padding == "max_length" else min(limit, PROMPT_TOKENS)
        ids = torch.ones(n, length, dtype=torch.long)
        return BatchEncoding({"input_ids": ids, "attention_mask": torch.ones_like(ids)})

    def apply_chat_template(self, conversation, tokenize: bool = True, **kwargs):
        if not tokenize:
            n = len(conversation) if conversation and isinstance(conversation[0], list) else 1
            return ["prompt"] * n if n > 1 or (conversation and isinstance(conversation[0], list)) else "prompt"
        return self(["prompt"], padding=kwargs.get("padding"), max_length=kwargs.get("max_length"))

    def batch_decode(self, ids, **kwargs):
        return ["prompt"] * len(ids)


# ----------------------------------------------------------------------------------------------- building

def arch_folder(model_path: str) -> Path:
    """The folder whose configs describe model.path: a local pipeline folder, or the shipped published configs
    of a hub id (`leapalign/archs/<owner>/<name>`)."""
    from .backbones import resolve_model_path

    path = resolve_model_path(model_path)
    local = Path(path).expanduser()
    if local.exists():
        if not (local / "model_index.json").is_file():
            raise UserError(f"{local} is not a diffusers pipeline folder (no model_index.json); point model.path at one")
        return local
    shipped = ARCHS / path
    if (shipped / "model_index.json").is_file():
        return shipped
    known = sorted(str(p.parent.relative_to(ARCHS)) for p in ARCHS.glob("*/*/model_index.json"))
    raise UserError(f"cannot plan {model_path}: it is not a local pipeline folder and leapalign ships no architecture for it "
                    f"(shipped: {', '.join(known)}); download its configs (no weights needed) and set model.path to the folder")


def _max_length(folder: Path, cls_name: str) -> int:
    config = folder / "tokenizer_config.json"
    if config.is_file():
        value = json.loads(config.read_text()).get("model_max_length")
        if isinstance(value, int) and value < 10**6:
            return value
    return 77 if "CLIP" in cls_name else 512


def fake_pipeline(folder: Path, dtype: torch.dtype):
    """The pipeline of `folder` with every model built from its config (random init on fake tensors, in `dtype`)."""
    import diffusers
    import transformers

    index = json.loads((folder / "model_index.json").read_text())
    parts = {}
    for name, spec in index.items():
        if name.startswith("_") or not isinstance(spec, (list, tuple)):
            continue
        library, cls_name = spec
        sub = folder / name
        if cls_name is None:
            parts[name] = None
        elif "tokenizer" in name or "processor" in name:
            parts[name] = StubTokenizer(_max_length(sub, cls_name))
        elif "scheduler" in name:
            cls = getattr(diffusers, cls_name)
            with _real():  # a few real numbers, which the adapters copy and compute with
                parts[name] = cls.from_config(cls.load_config(sub))
        elif library == "diffusers":
            cls = getattr(diffusers, cls_name)
            parts[name] = cls.from_config(cls.load_config(sub))
        else:
            cls = getattr(transformers, cls_name)
            config = transformers.AutoConfig.from_pretrained(sub)
            parts[name] = cls._from_config(config, dtype=dtype)
    pipe = getattr(diffusers, index["_class_name"])(**parts)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def fake_reward(cfg):
    """The configured reward at full size: a built-in CLIP-family reward built from its published config with random
    weights; any other reward (ShapeWorld's, a user's callable) is loaded as it is, for real (it must be local)."""
    from .rewards import CheckedReward, load_reward

    fn = cfg.reward.fn
    arch = {"hpsv2": "clip-vit-h-14", "hpsv2.1": "clip-vit-h-14", "pickscore": "clip-vit-h-14", "clipscore": "clip-vit-l-14",
            "aesthetic": "clip-vit-l-14"}.get(fn) if isinstance(fn, str) else None
    if arch is None:
        with _real():
            return load_reward(fn, cfg.reward.path)
    from transformers import CLIPConfig, CLIPModel

    from .rewards.builtin import AestheticReward
    from .rewards.clip import ClipReward

    config = CLIPConfig.from_dict(json.loads((ARCHS / "rewards" / f"{arch}.json").read_text()))
    model = CLIPModel(config)
    if fn == "aesthetic":
        dims = [(1024, 768), (128, 1024), (64, 128), (16, 64), (1, 16)]
        with _real():
            mlp = {f"layers.{i}.{kind}": torch.zeros(*(d if kind == "weight" else d[:1]))
                   for i, d in zip((0, 2, 4, 6, 7), dims) for kind in ("weight", "bias")}
        module = AestheticReward(model, mlp)
    else:
        module = ClipReward(model, StubTokenizer(config.text_config.max_position_embeddings))
    return CheckedReward(module, fn)


@contextlib.contextmanager
def _fake_conversions():
    """`module.to(...)` on fake parameters: torch swaps a fake parameter for its converted copy, which fails (fake
    tensors carry weak references); setting `.data` instead converts them in place, as it does real ones."""
    original = torch.nn.Module._apply

    def _apply(self, fn, recurse=True):
        if recurse:
            for child in self.children():
                child._apply(fn)
        for param in self._parameters.values():
            if param is not None:
                with torch.no_grad():
                    applied = fn(param)
                if applied is not param:
                    param.data = applied
        for key, buf in self._buffers.items():
            if buf is not None:
                self._buffers[key] = fn(buf)
        return self

    torch.nn.Module._apply = _apply
    try:
        yield
    finally:
        torch.nn.Module._apply = original


def _with_real_tensors(fn):
    def call(*args, **kwargs):
        with _real():
            return fn(*args, **kwargs)
    return call


@contextlib.contextmanager
def _real():
    """Real tensors inside a fake trace (a small reward loaded from its files)."""
    from torch._subclasses.fake_tensor import unset_fake_temporarily

    with unset_fake_temporarily():
        yield


# ----------------------------------------------------------------------------------------------- one plan

@dataclass
class Plan:
    """One traced configuration: per-rank peak device bytes by category, host bytes, FLOPs and the verdict."""

    label: str
    processes: int
    peak: int  # traced device bytes at the step's peak (without CUDA_OVERHEAD)
    peak_phase: str
    peak_bytes: dict
    phase_peaks: dict
    host: dict
    flops: int  # per rank and iteration
    params: dict = field(default_factory=dict)

    def device_bytes(self) -> int:
        return self.peak + CUDA_OVERHEAD

    def fits(self, gpu_memory_gib: float) -> bool:
        return self.device_bytes() <= gpu_memory_gib * GiB

    def seconds(self, accelerator: str, dtype: str, utilisation: float) -> float:
        return self.flops / (ACCELERATORS[accelerator][dtype] * 1e12 * utilisation)


def _component_labels(run, trace: MemoryTrace) -> None:
    """Weights by what they are; trained weights, masters, EMA and optimiser states by their role."""
    pipe = run.backbone.pipe
    for name in ("text_encoder", "text_encoder_2", "text_encoder_3", "vae"):
        module = getattr(pipe, name, None)
        if isinstance(module, torch.nn.Module):
            category = "frozen vae" if name == "vae" else "frozen text encoders"
            trace.label(list(module.parameters()) + list(module.buffers()), category)
    reward = run.reward.fn if hasattr(run.reward, "fn") else run.reward
    if isinstance(reward, torch.nn.Module):
        trace.label(list(reward.parameters()) + list(reward.buffers()), "frozen reward")
    tr = run.backbone.transformer
    trace.label([p for p in tr.parameters() if not p.requires_grad] + list(tr.buffers()), "frozen transformer")
    if run.anchor_base is not None:
        trace.label(list(run.anchor_base.transformer.parameters()), "frozen transformer")
    trace.label(run.model_params, "trained weights")
    if run.master.params is not run.master.model:
        trace.label(run.master.params, "optimizer states and masters")
    if run.ema is not None:
        trace.label(run.ema.shadow, "optimizer states and masters")
    trace.label([v for s in run.optimizer.state.values() for v in s.values()], "optimizer states and masters")


@contextlib.contextmanager
def _phases(run, trace: MemoryTrace):
    """Name the phases of a step as they run, and label gradients when a backward ends."""
    from . import objective, train

    def wrap(module, name: str, phase: str, default: str = "activations and temporaries"):
        original = getattr(module, name)

        def wrapped(*args, **kwargs):
            with trace.in_phase(phase, default):
                out = original(*args, **kwargs)
            trace.label([p.grad for p in run.backbone.transformer.parameters() if p.grad is not None], "gradients")
            return out

        setattr(module, name, wrapped)
        return module, name, original

    patched = [wrap(train, "rollout_for", "rollout"), wrap(objective, "reward_gradient", "decode + reward gradient"),
               wrap(objective, "backward_surrogates", "surrogate backward"), wrap(objective, "anchor_backward", "anchor backward"),
               wrap(run, "_optimiser_step", "optimizer step", "optimizer states and masters")]
    hooks = [p.register_post_accumulate_grad_hook(lambda p: trace.label([p.grad], "gradients")) for p in run.model_params]
    try:
        yield
    finally:
        for h in hooks:
            h.remove()
        for module, name, original in patched:
            if module is run:
                delattr(run, name)
            else:
                setattr(module, name, original)


@contextlib.contextmanager
def _state_setup(trace: MemoryTrace):
    """The fp32 masters and the EMA are made as optimiser state (in CPU memory with train.offload_optimizer)."""
    from . import train

    originals = {name: getattr(train, name) for name in ("MasterWeights", "EMA")}

    def wrap(cls):
        def make(*args, **kwargs):
            with trace.in_phase(trace.phase, "optimizer states and masters"):
                return cls(*args, **kwargs)
        return make

    for name, cls in originals.items():
        setattr(train, name, wrap(cls))
    try:
        yield
    finally:
        for name, cls in originals.items():
            setattr(train, name, cls)


@contextlib.contextmanager
def _repeated_calls(backbone, trace: MemoryTrace):
    """Trace a no-gradient model call once per input shape: a repeat (the rollout's other steps) allocates the same
    on fake tensors, so it adds the first call's rise above what was live and its FLOPs, and returns an output of the
    same shape without running.  Calls with gradient (kept for the surrogates, re-run in them) always run."""
    original = backbone.velocity
    seen: dict = {}

    def velocity(x, sigma, cond):
        if torch.is_grad_enabled():
            return original(x, sigma, cond)
        key = (tuple(x.shape), x.dtype, tuple((k, tuple(v.shape)) for k, v in cond.batch.items()))
        if key in seen:
            rise, flops, shape, dtype = seen[key]
            trace.flops += flops
            temporaries = "activations and temporaries"
            trace.device_total += rise
            trace.bytes[temporaries] += rise
            trace._update_peak()
            trace.device_total -= rise
            trace.bytes[temporaries] -= rise
            return torch.empty(shape, dtype=dtype, device=x.device)
        live, flops, before = trace.device_total, trace.flops, (trace.peak, trace.peak_bytes, trace.peak_phase)
        trace.peak = live  # the call's own high-water mark, then the larger of the two
        out = original(x, sigma, cond)
        seen[key] = (trace.peak - live, trace.flops - flops, tuple(out.shape), out.dtype)
        if before[0] > trace.peak:
            trace.peak, trace.peak_bytes, trace.peak_phase = before
        return out

    backbone.velocity = velocity
    try:
        yield
    finally:
        del backbone.velocity


@contextlib.contextmanager
def _fake_processes(world: int):
    """A process group of `world` fake ranks in this process (collectives do nothing); this process is rank 0."""
    import torch.distributed as dist

    if world <= 1:
        yield None
        return
    from torch.distributed.device_mesh import init_device_mesh
    from torch.testing._internal.distributed.fake_pg import FakeStore

    dist.init_process_group("fake", store=FakeStore(), rank=0, world_size=world)
    try:
        yield init_device_mesh("cpu", (world,))
    finally:
        dist.destroy_process_group()


def _prompt_rows(spec: str) -> list[dict]:
    """The configured training prompts where they can be read here, else stand-ins (only their count of tokens matters)."""
    from .evaluation import load_prompt_rows

    try:
        return load_prompt_rows(spec)
    except UserError:
        return [{"prompt": f"prompt {i}"} for i in range(8)]


def trace_step(cfg, processes: int = 1, label: str = "", fake: bool = True, random_weights: bool = False,
               device: str = "cpu") -> Plan:
    """`_trace_step`, with a failure inside the model's code on fake tensors turned into one line."""
    import logging

    fake_log = logging.getLogger("torch._subclasses.fake_tensor")  # it logs the failing operator before raising
    level = fake_log.level
    fake_log.setLevel(logging.CRITICAL)
    try:
        return _trace_step(cfg, processes, label, fake, random_weights, device)
    except UserError:
        raise
    except Exception as e:
        if not fake:
            raise
        first = (str(e).strip().splitlines() or [""])[0][:300]
        raise UserError(f"cannot plan {cfg.model.path}: its code failed on fake tensors ({type(e).__name__}: {first})") from None
    finally:
        fake_log.setLevel(level)


def _trace_step(cfg, processes: int, label: str, fake: bool, random_weights: bool, device: str) -> Plan:
    """One `Run.train_step` of the configuration on rank 0 of `processes`, traced by MemoryTrace.

    fake=True (the plan): the pipeline built from its architecture configs on fake tensors, nothing allocated.
    fake=False (to grade the plan): the real pipeline and reward loaded and stepped for real, one process, on
    `device`; with `random_weights` built from the same configs as the plan with random weights instead (a GPU check
    of a model whose weights are not on the machine).
    """
    from torch._subclasses.fake_tensor import FakeTensorMode

    from .backbones import ADAPTERS, DTYPES, adapter_options, load_backbone, set_attention_backend
    from .rewards import load_reward
    from .train import Run

    mc, tc = cfg.model, cfg.train
    folder = arch_folder(mc.path)
    cls_name = json.loads((folder / "model_index.json").read_text()).get("_class_name")
    if cls_name not in ADAPTERS:
        raise UserError(f"cannot plan {mc.path}: {cls_name} is not supported (supported: {', '.join(ADAPTERS)})")
    dtype = DTYPES[mc.dtype]
    host = set()
    if tc.offload_optimizer:
        host.add("optimizer states and masters")
    if tc.text_cache == "cpu":
        host.add("frozen text encoders")
    trace = MemoryTrace(host)
    rows = _prompt_rows(tc.prompts)
    fake_mode = FakeTensorMode(allow_non_fake_inputs=True) if fake else contextlib.nullcontext()
    with _fake_processes(processes if fake else 1) as mesh, _fake_conversions() if fake else contextlib.nullcontext(), fake_mode, trace:
        if fake or random_weights:
            default_dtype = torch.get_default_dtype()
            torch.set_default_dtype(dtype)
            try:
                with torch.device(device):
                    pipe = fake_pipeline(folder, dtype)
            finally:
                torch.set_default_dtype(default_dtype)
            for name in ("vae", "text_encoder", "text_encoder_2", "text_encoder_3"):
                module = getattr(pipe, name, None)
                if isinstance(module, torch.nn.Module):
                    module.requires_grad_(False).eval()
            adapter = ADAPTERS[cls_name]
            backbone = adapter(pipe, **adapter_options(adapter, mc))
            if hasattr(backbone, "merge_padding"):
                backbone.merge_padding = False  # it reads the encodings' values: a fake trace sees every padded token
            if fake:
                backbone.sigmas = _with_real_tensors(backbone.sigmas)  # the schedule is a few real numbers (SD3 copies its scheduler)
            if mc.attention_backend:
                set_attention_backend(backbone, mc.attention_backend)
            try:
                backbone.check_resolution(mc.height, mc.width)
            except ValueError as e:
                raise UserError(f"model.height/width: {e}") from None
        else:
            backbone = load_backbone(mc, device)
        with trace.in_phase("load reward", "frozen reward"):
            reward = fake_reward(cfg) if fake or random_weights else load_reward(cfg.reward.fn, cfg.reward.path)
            if not fake:
                reward.to(device)
        with trace.in_phase("setup"), _state_setup(trace):
            run = Run.headless(cfg, backbone, reward, rank=0, world=processes if fake else 1, rows=rows, mesh=mesh)
        _component_labels(run, trace)
        with _phases(run, trace), _repeated_calls(backbone, trace) if fake else contextlib.nullcontext(), trace.in_phase("train step"):
            run.train_step(0)
        _component_labels(run, trace)
        params = {"trained": sum(p.numel() for p in run.params),
                  "transformer": sum(p.numel() for p in backbone.transformer.parameters())}
    host_bytes = {k: v for k, v in trace.bytes.items() if k in host and v}
    return Plan(label, processes, trace.peak, trace.peak_phase, dict(trace.peak_bytes), dict(trace.phase_peaks), host_bytes,
                int(trace.flops), params)


# ----------------------------------------------------------------------------------------------- what fits

def candidate_changes(cfg, processes: int) -> list[tuple[str, str]]:
    """Changes that lower memory, cheapest first (in time per step and in what they change of the method): each is a
    `--set` override and why; only those that differ from the configuration."""
    tc, mc = cfg.train, cfg.model
    out = []
    if not tc.gradient_checkpointing:
        out.append(("train.gradient_checkpointing=true", "recompute transformer blocks in backward (~30% more time)"))
    if not tc.vae_checkpointing:
        out.append(("train.vae_checkpointing=true", "recompute the VAE decoder's blocks in the reward gradient"))
    if tc.decode_batch != 1 and tc.batch_size > 1:
        out.append(("train.decode_batch=1", "decode and score one sample at a time"))
    if mc.detach_uncond is not True:
        out.append(("model.detach_uncond=true", "real CFG: the unconditional pass without gradient (no effect without CFG)"))
    if tc.text_cache != "cpu":
        out.append(("train.text_cache=cpu", "text encoders in CPU memory"))
    if processes > 1 and tc.parallel != "fsdp":
        out.append(("train.parallel=fsdp", f"shard weights, gradients and states over {processes} GPUs"))
    if tc.finetune == "full" and processes == 1 or tc.finetune == "full" and tc.parallel != "fsdp":
        if tc.optimizer != "adamw8bit":
            out.append(("train.optimizer=adamw8bit", "8-bit AdamW moments (bitsandbytes)"))
        if not tc.offload_optimizer:
            out.append(("train.offload_optimizer=true", "fp32 masters, AdamW states and EMA in CPU memory"))
    if tc.finetune == "full":
        out.append(("train.finetune=lora", "LoRA instead of full fine-tuning"))
    if tc.batch_size > 1:
        half = tc.batch_size // 2
        out.append((f"train.batch_size={half} train.grad_accum={tc.grad_accum * tc.batch_size // half}",
                    "half the batch per pass, the same batch per step"))
    return out


def with_changes(cfg, changes: list[str]):
    """A copy of `cfg` with `section.key=value` overrides (several per change, space-separated) applied."""
    import copy

    from . import config as config_mod

    data = copy.deepcopy(cfg.to_dict())
    for change in changes:
        for item in change.split():
            key, value = item.split("=", 1)
            section, name = key.split(".")
            data[section][name] = config_mod.parse_scalar(value)
    return config_mod.build(data)


def find_fit(cfg, processes: int, gpu_memory: float, progress=print) -> tuple[list[str], Plan | None]:
    """Add the candidate changes one at a time, cheapest first, planning after each; stop at the first that fits.
    Returns (the changes, the plan that fits) or (the changes tried, None)."""
    applied: list[str] = []
    current = cfg
    for change, why in candidate_changes(cfg, processes):
        try:
            trial = with_changes(current, [change])
        except UserError:
            continue  # a combination the trainer refuses (e.g. 8-bit states with fsdp)
        progress(f"planning with {change} ({why}) ...")
        result = trace_step(trial, processes, label=change)
        applied.append(change)
        current = trial
        if result.fits(gpu_memory):
            return applied, result
    return applied, None


# ----------------------------------------------------------------------------------------------- report

def report(plan: Plan, cfg, gpu_memory: float, accelerator: str, utilisation: float) -> dict:
    """The plan as the JSON object `leapalign plan --json` prints."""
    compute = cfg.model.dtype
    return {"model": cfg.model.path, "method": cfg.method["name"] if isinstance(cfg.method, dict) else cfg.method.name,
            "finetune": cfg.train.finetune, "processes": plan.processes,
            "parallel": cfg.train.parallel if plan.processes > 1 else "none",
            "resolution": [cfg.model.height, cfg.model.width], "batch_per_gpu": cfg.train.batch_size,
            "rollout_steps": cfg.train.num_steps,
            "per_rank": {"peak_bytes": plan.device_bytes(), "traced_peak_bytes": plan.peak, "cuda_overhead_bytes": CUDA_OVERHEAD,
                         "peak_phase": plan.peak_phase, "categories": {k: plan.peak_bytes.get(k, 0) for k in CATEGORIES},
                         "phase_peaks": plan.phase_peaks, "host_bytes": plan.host},
            "parameters": plan.params, "flops_per_iteration": plan.flops,
            "seconds_estimate": {"seconds": plan.seconds(accelerator, compute, utilisation), "accelerator": accelerator,
                                 "dtype": compute, "utilisation": utilisation,
                                 "peak_tflops": ACCELERATORS[accelerator][compute]},
            "gpu_memory_gib": gpu_memory, "fits": plan.fits(gpu_memory)}


def format_report(r: dict) -> str:
    g = lambda b: f"{b / GiB:7.2f} GiB"  # noqa: E731
    pr, est = r["per_rank"], r["seconds_estimate"]
    lines = [f"plan: {r['model']}, {r['method']} {r['finetune']}, {r['resolution'][0]}x{r['resolution'][1]}, batch {r['batch_per_gpu']} "
             f"per GPU, {r['rollout_steps']} rollout steps, {r['processes']} process(es)"
             + (f" ({r['parallel']})" if r["processes"] > 1 else ""),
             f"traced on fake tensors (nothing allocated): per GPU (every rank alike)",
             f"  peak                          {g(pr['peak_bytes'])}   in '{pr['peak_phase']}'"]
    for k, v in pr["categories"].items():
        if v:
            lines.append(f"    {k:28s}{g(v)}")
    lines.append(f"    {'CUDA context, workspaces':28s}{g(pr['cuda_overhead_bytes'])}   (allowance, not traced)")
    if pr["host_bytes"]:
        lines.append("  in CPU memory: " + ", ".join(f"{k} {v / GiB:.2f} GiB" for k, v in pr["host_bytes"].items()))
    lines.append("  phase peaks: " + ", ".join(f"{k} {v / GiB:.1f}" for k, v in pr["phase_peaks"].items()) + " GiB")
    lines.append(f"  {r['flops_per_iteration'] / 1e12:.1f} TFLOP per iteration per GPU; estimate {est['seconds']:.1f} s per iteration on "
                 f"{est['accelerator'].upper()} ({est['dtype']} dense peak {est['peak_tflops']:g} TFLOP/s at {est['utilisation']:.0%}), "
                 "an estimate, not a measurement")
    verdict = "fits" if r["fits"] else "does not fit"
    lines.append(f"  {verdict} in {r['gpu_memory_gib']:g} GiB")
    return "\n".join(lines)
