"""Checkpoint folder -> model: validate the config against the stored tensors, load the model,
read the projector's stored tensors (the fp32 master copies start from these exact values)."""
from __future__ import annotations

import json
import math
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path

import torch

from . import safetensors_io as st
from .errors import UserError
from .models import Adapter, adapter_for, stored_names, stored_projector_names
from .ranks import place_sharded
from .scope import open_scope


@dataclass
class Loaded:
    """A checkpoint opened for the job: the model (vision tower dropped after caching) and its parts."""

    ckpt: Path
    adapter: Adapter
    model: torch.nn.Module
    processor: object
    stored: dict[str, st.TensorInfo]
    names: dict[str, str]  # projector module-relative name (or scope.TOWER key) -> stored name
    original: dict[str, torch.Tensor]  # stored tensors of the edit's room, as stored
    device: torch.device
    pixel_cache: OrderedDict = field(default_factory=OrderedDict)  # the last PIXEL_CACHE_PICTURES pictures
    feature_cache: object = None  # features.FeatureCache, made by the first cache_samples


def read_model_config(ckpt: Path):
    """config.json, checked against the supported families before transformers parses it."""
    from transformers import AutoConfig

    path = Path(ckpt) / "config.json"
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise UserError(f"{path}: unreadable ({e.__class__.__name__}: {e})") from None
    if not isinstance(raw, dict) or not isinstance(raw.get("model_type"), str):
        raise UserError(f"{path}: no model_type; is this a Hugging Face checkpoint?")
    adapter_for(raw["model_type"])  # names the supported families when there is no adapter
    try:
        return AutoConfig.from_pretrained(ckpt, trust_remote_code=False)
    except Exception as e:  # transformers raises many types for a config it cannot parse
        raise UserError(f"{path}: transformers cannot parse it ({str(e).splitlines()[0]})") from None


def inspect_checkpoint(ckpt: Path):
    """Validate a checkpoint folder without loading weights: (stored tensors, config, adapter)."""
    stored = st.read_checkpoint(ckpt)
    config = read_model_config(ckpt)
    adapter = adapter_for(config.model_type)
    adapter.check_config(config)
    return stored, config, adapter


def check_weights_match_config(ckpt: Path) -> None:
    """Before any model is built for real: config.json must describe the stored tensors. The model
    is built on the meta device (no memory); its projector shapes must be the stored ones and its
    size the stored size (one tied copy allowed), so a config with missing fields, which
    transformers fills with defaults (a 7B LLM), fails here instead of allocating it."""
    from transformers import AutoModelForImageTextToText

    stored, config, adapter = inspect_checkpoint(ckpt)
    try:
        with torch.device("meta"):
            model = AutoModelForImageTextToText.from_config(config, trust_remote_code=False)
    except Exception as e:  # transformers raises many types for a config it cannot build
        raise UserError(f"{Path(ckpt) / 'config.json'}: transformers cannot build the model ({str(e).splitlines()[0][:200]})") from None
    module = dict(adapter.projector_module(model).named_parameters())
    for name, stored_name in stored_projector_names(adapter, list(module), list(stored)).items():
        if tuple(module[name].shape) != stored[stored_name].shape:
            raise UserError(f"{Path(ckpt) / 'config.json'}: implies {stored_name} of shape {tuple(module[name].shape)}, "
                            f"the checkpoint stores {stored[stored_name].shape}; config.json does not match the weights")
    in_model = sum(p.numel() for p in model.parameters())
    sizes = [math.prod(info.shape) for info in stored.values()] or [0]
    if not sum(sizes) - max(sizes) <= in_model <= sum(sizes):
        raise UserError(f"{Path(ckpt) / 'config.json'}: describes a model of {in_model:,} parameters, the checkpoint "
                        f"stores {sum(sizes):,}; config.json does not match the weights")


def scoped_adapter(ckpt: Path, k: int) -> Adapter:
    """The checkpoint's adapter, given the tower layers `--scope vision:k` edits (the model built on the
    meta device to find them: no memory)."""
    from transformers import AutoModelForImageTextToText

    _, config, adapter = inspect_checkpoint(ckpt)
    if k:
        with torch.device("meta"):
            open_scope(adapter, AutoModelForImageTextToText.from_config(config, trust_remote_code=False), k)
    return adapter


def open_checkpoint(ckpt: Path, device: torch.device, llm_later: bool = False, scope: int = 0) -> Loaded:
    """The checkpoint, loaded for the job. On a CPU the model computes in fp32 (bf16/fp16 matmuls are
    slow or missing there), on CUDA in the stored dtype. A checkpoint stored in one float dtype is
    loaded as stored and cast tensor by tensor (loading straight to fp32 holds the stored bytes and
    the fp32 copies at once). With `llm_later`, the language model and lm_head stay as stored until
    `compute_dtype` (the job caches the features and drops the tower first: the two are never held
    in fp32 together). `scope`: how many of the tower's last layers the job edits beside the connector
    (scope.py); their tensors join the projector's in `names` and `original`."""
    ckpt = Path(ckpt)
    stored, config, adapter = inspect_checkpoint(ckpt)
    floats = {info.dtype for info in stored.values() if info.dtype in ("F64", "F32", "F16", "BF16")}
    dtype = _stored_dtype(stored) if device.type != "cpu" or len(floats) == 1 else torch.float32
    model = _from_pretrained(ckpt, dtype)
    if device.type == "cpu" and dtype != torch.float32 and _rounded_buffers(model, dtype):
        del model  # a buffer the model computes when built (Gemma's embed_scale) would differ from fp32's
        model = _from_pretrained(ckpt, torch.float32)
    if not place_sharded(model, device):  # FSDP2-sharded LLM under torchrun --shard-llm
        model.to(device)
    processor = adapter.load_processor(ckpt)

    module = dict(adapter.projector_module(model).named_parameters())
    names = stored_projector_names(adapter, list(module), list(stored))
    tower = open_scope(adapter, model, scope)  # the tower layers the job may edit too (--scope vision:K)
    names.update(stored_names({key: stem for key, (_, stem) in tower.items()}, list(stored)))
    module.update({key: p for key, (p, _) in tower.items()})
    original = {}
    for name, stored_name in names.items():
        info = stored[stored_name]
        if tuple(module[name].shape) != info.shape:
            raise UserError(
                f"{stored_name}: config.json implies shape {tuple(module[name].shape)}, the checkpoint stores {info.shape}"
            )
        original[name] = st.read_tensor(info)
    loaded = Loaded(ckpt, adapter, model, processor, stored, names, original, device)
    if device.type == "cpu":
        language_model = getattr(model.model, "language_model", getattr(model.model, "text_model", None))
        later = [language_model, model.get_output_embeddings()] if llm_later and language_model is not None else []
        _to_fp32(model, {id(t) for m in later for t in [*m.parameters(), *m.buffers()]})
    return loaded


def _from_pretrained(ckpt: Path, dtype: torch.dtype):
    from transformers import AutoModelForImageTextToText

    try:
        model = AutoModelForImageTextToText.from_pretrained(ckpt, dtype=dtype, trust_remote_code=False, use_safetensors=True)
    except (OSError, ValueError, RuntimeError) as e:
        raise UserError(f"{ckpt}: cannot load the model ({str(e).splitlines()[0]})") from None
    return model.eval().requires_grad_(False)


def _rounded_buffers(model: torch.nn.Module, dtype: torch.dtype) -> bool:
    """Does the model hold a buffer it computed when built (not read from the checkpoint) in `dtype`?
    Cast to fp32 afterwards, it would keep `dtype`'s rounding."""
    return any(module._buffers[name] is not None and module._buffers[name].dtype == dtype
               for module in model.modules() for name in module._non_persistent_buffers_set)


def compute_dtype(loaded: Loaded, keep_embeddings: bool = False) -> None:
    """The whole model in the compute dtype (fp32 on a CPU; a no-op where already there). With
    `keep_embeddings`, an input embedding table that is a plain lookup (nn.Embedding, not tied to the
    lm_head) stays as stored and its rows are cast when looked up: exact, and fp32 would double the
    table for nothing (the job only looks rows up)."""
    if loaded.device.type != "cpu":
        return
    model = loaded.model
    table = model.get_input_embeddings()
    plain = type(table) is torch.nn.Embedding and table.weight is not model.get_output_embeddings().weight
    kept = _to_fp32(model, {id(table.weight)} if keep_embeddings and plain else set())
    if kept and not getattr(table, "_fastunlearn_cast", False):
        table.register_forward_hook(lambda module, args, output: output.float())
        table._fastunlearn_cast = True


def _to_fp32(model: torch.nn.Module, skip: set[int]) -> bool:
    """Every floating-point parameter and buffer of `model` in fp32, one at a time, but those in `skip`
    (ids); all of them after all when a skipped one is the model's first parameter, since family code
    casts inputs to `model.dtype` (its first parameter's). Returns whether the skipped ones stayed."""
    for t in [*model.parameters(), *model.buffers()]:
        if id(t) not in skip and t.is_floating_point() and t.dtype != torch.float32:
            t.data = t.data.float()
    if skip and model.dtype != torch.float32:
        return _to_fp32(model, set())
    return bool(skip)


def _stored_dtype(stored: dict[str, st.TensorInfo]) -> torch.dtype:
    counts: dict[str, int] = {}
    for info in stored.values():
        counts[info.dtype] = counts.get(info.dtype, 0) + (info.end - info.start)
    best = max((d for d in counts if d in st.TORCH_DTYPES), key=counts.get, default="F32")
    return st.TORCH_DTYPES[best]


def master_params(loaded: Loaded, tensors: dict[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
    """fp32 copies of projector tensors on the job's device (exact: every stored dtype fits in fp32)."""
    tensors = loaded.original if tensors is None else tensors
    return {n: t.to(loaded.device, torch.float32).clone() for n, t in tensors.items()}
