"""Memory and time of `fastunlearn apply` on a checkpoint of real width but only two decoder layers.

    python benchmarks/real_width.py --family llava|qwen2_vl [--pictures 8] [--steps 3] [--workdir DIR] [--json OUT]
                                    [--image-size PX] [--vocab V] [--keep]
    python benchmarks/real_width.py --rederive RESULT.json [--json OUT]

What it builds (in `--workdir`, a new temporary folder by default): a checkpoint of the family's real
transformers class with random bf16 weights, every dimension of the 7B model but depth: LLaVA-1.5-7B
(CLIP-L/14 at 336 px: 576 image tokens, vision hidden 1024; Llama hidden 4096, intermediate 11008, 32
heads, vocabulary 32064) or Qwen2-VL-7B (vision embed 1280, 16 heads, merger 5120 -> 3584; LLM hidden
3584, intermediate 18944, 28 heads, 4 kv heads, vocabulary 152064), with 2 vision layers and 2 decoder
layers, saved by `save_pretrained` as Hub-layout shards (model-0000x-of-0000y.safetensors and
model.safetensors.index.json) beside a real processor: LlavaProcessor + CLIPImageProcessor at 336 px,
or Qwen2-VL's image processor with its own pixel limits; the tokenizer is the worlds' byte-level BPE
with the family's special tokens and chat template (fastunlearn/worlds/tokenizers.py). Then a forget
folder and a retain folder of `--pictures` pictures each (two people, QA lines, so no greedy answers
are generated), drawn at the processor's size (`--image-size`: Qwen2-VL's picture size sets its token
count; 448 px = 256 image tokens).

What it measures, each in a fresh process:
- `apply`: `fastunlearn apply CKPT FORGET --retain RETAIN --out DIR --steps N --device cpu` (the CLI,
  in process). Peak RSS per phase: at each phase boundary the job calls `trim_heap` (job.py's
  `phase`); this script wraps that one name to read VmHWM (the peak since the last boundary), VmRSS,
  RssAnon and RssFile from /proc/self/status, then resets VmHWM to the current RSS (write "5" to
  /proc/self/clear_refs). The first phase also holds the checks before the job (headers,
  fingerprints); the last one, `write`, is everything after the job's `evaluate` (write, hashes,
  report). RSS counts mapped file pages (RssFile): safetensors tensors still mapped from the file.
  Resetting VmHWM also resets what getrusage reports, so the report's own peak_memory_mb is not the
  job's peak under this script; the largest phase peak is.
  Also: the report's phases_s, the step time (optimise seconds / steps), the byte ranges written
  (report changed_tensors, byte_proof.bytes_written), and the bytes each decoder layer's forward
  saved for backward (torch.autograd.graph.saved_tensors_hooks around the job; frozen weights
  excluded, a storage counted once per forward), per token, in the largest pass with gradients.
- `probe`: decoder layers of the same class and width (a 2-layer text model fed inputs_embeds that
  require grad, weights frozen as in the job, 2 right-padded sequences of the job's length), the bytes
  the second layer saves for backward (what each further layer adds) in bf16 and in fp32 (the dtypes
  of a GPU run and of the CPU job), and what the layers share (the attention mask).

Then it derives, from these per-layer figures and the stored tensor sizes, what the model at its real
depth (LLaVA-1.5-7B: 32 decoder and 24 CLIP layers; Qwen2-VL-7B: 28 and 32) needs (see `derive`): on a
GPU in bf16, weights plus the activations the sequences held at once save (one process: a pass of 8;
a torchrun rank: its share of the step's 32); on a CPU, the measured phase peaks plus each further
layer's fp32 weights and saved activations. Prints and writes (`--json`) everything; `--rederive
RESULT.json` recomputes the derived figures from a result file. Results: benchmarks/RESULTS.md,
"Real-width memory".
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import tempfile
import time
import weakref
from pathlib import Path

HERE = Path(__file__).resolve()
REAL_DEPTH = {"llava": {"text": 32, "vision": 24}, "qwen2_vl": {"text": 28, "vision": 32}}
PASS = {"cpu": 4, "cuda": 8}  # fastunlearn.optimise.STEP_PASS, checked against the import in derive()


# ---------------------------------------------------------------- building the checkpoint


def build_llava(out: Path, vocab: int):
    from transformers import (CLIPImageProcessor, CLIPVisionConfig, LlamaConfig, LlavaConfig,
                              LlavaForConditionalGeneration, LlavaProcessor)

    from fastunlearn.worlds.tokenizers import LLAVA_CHAT_TEMPLATE, build_tokenizer

    tok = build_tokenizer("llava")
    image_processor = CLIPImageProcessor(  # llava-hf/llava-1.5-7b-hf's preprocessor_config.json
        size={"shortest_edge": 336}, crop_size={"height": 336, "width": 336}, do_resize=True, do_center_crop=True,
        do_rescale=True, do_normalize=True, do_convert_rgb=True, resample=3)
    processor = LlavaProcessor(image_processor=image_processor, tokenizer=tok, patch_size=14,
                               vision_feature_select_strategy="default", num_additional_image_tokens=1,
                               chat_template=LLAVA_CHAT_TEMPLATE)
    vision = CLIPVisionConfig(hidden_size=1024, intermediate_size=4096, num_hidden_layers=2, num_attention_heads=16,
                              image_size=336, patch_size=14, projection_dim=768, hidden_act="quick_gelu",
                              layer_norm_eps=1e-5)
    text = LlamaConfig(vocab_size=vocab, hidden_size=4096, intermediate_size=11008, num_hidden_layers=2,
                       num_attention_heads=32, num_key_value_heads=32, max_position_embeddings=4096, rms_norm_eps=1e-5,
                       bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
                       tie_word_embeddings=False)
    config = LlavaConfig(vision_config=vision, text_config=text, image_token_id=tok.convert_tokens_to_ids("<image>"),
                         vision_feature_layer=-2, vision_feature_select_strategy="default", projector_hidden_act="gelu",
                         tie_word_embeddings=False)
    model = _random_bf16(LlavaForConditionalGeneration, config)
    _generation_ids(model, tok)
    _save(model, [processor], out)


def build_qwen2_vl(out: Path, vocab: int, image_size: int):
    from transformers import Qwen2VLConfig, Qwen2VLForConditionalGeneration
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    from fastunlearn.worlds.tokenizers import QWEN_SPECIALS, build_tokenizer

    tok = build_tokenizer("qwen2_vl")
    # Qwen/Qwen2-VL-7B-Instruct's pixel limits; the picture's own size sets the token count
    image_processor = Qwen2VLImageProcessorPil(size={"shortest_edge": 56 * 56, "longest_edge": 28 * 28 * 1280},
                                               patch_size=14, merge_size=2, temporal_patch_size=2)
    ids = {k: tok.convert_tokens_to_ids(v) for k, v in QWEN_SPECIALS.items()}
    config = Qwen2VLConfig(
        vision_config=dict(depth=2, embed_dim=1280, hidden_size=3584, num_heads=16, mlp_ratio=4, patch_size=14,
                           spatial_merge_size=2, temporal_patch_size=2, in_channels=3, hidden_act="quick_gelu"),
        text_config=dict(vocab_size=vocab, hidden_size=3584, intermediate_size=18944, num_hidden_layers=2,
                         num_attention_heads=28, num_key_value_heads=4, max_position_embeddings=32768,
                         rms_norm_eps=1e-6, hidden_act="silu",
                         rope_parameters={"rope_type": "default", "rope_theta": 1e6, "mrope_section": [16, 24, 24]},
                         bos_token_id=ids["im_start"], eos_token_id=ids["eos"], pad_token_id=ids["pad"],
                         tie_word_embeddings=False),
        image_token_id=ids["image"], video_token_id=ids["video"], vision_start_token_id=ids["vision_start"],
        vision_end_token_id=ids["vision_end"], bos_token_id=ids["im_start"], eos_token_id=ids["eos"],
        pad_token_id=ids["pad"], tie_word_embeddings=False)
    model = _random_bf16(Qwen2VLForConditionalGeneration, config)
    _generation_ids(model, tok)
    _save(model, [tok, image_processor], out)


def _random_bf16(cls, config):
    """The model with its own random initialisation, created in bf16 (an fp32 copy of the Qwen2-VL
    one would need 6.5 GB more)."""
    import torch

    torch.manual_seed(0)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    try:
        model = cls(config)
    finally:
        torch.set_default_dtype(previous)
    return model.to(torch.bfloat16).eval()


def _generation_ids(model, tok):
    g = model.generation_config
    g.eos_token_id, g.pad_token_id, g.bos_token_id = tok.eos_token_id, tok.pad_token_id, tok.bos_token_id
    g.do_sample = False


def _save(model, parts, out: Path):
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out, max_shard_size="1GB")  # several shards and the index, as on the Hub
    for part in parts:
        part.save_pretrained(out)


def write_folder(root: Path, people: tuple[int, int], n: int, seed: int, size: int):
    """n pictures (n/2 of each of two people, size x size) with one QA line each."""
    import numpy as np

    from fastunlearn.worlds import people as world

    for j, i in enumerate(people):
        folder = root / world.slug(i)
        folder.mkdir(parents=True, exist_ok=True)
        rng = np.random.default_rng([seed, i])
        lines = []
        for k in range(n // 2 + (j < n % 2)):
            world.draw_face(i, rng, size=size).save(folder / f"{k}.png")
            q, a = world.visual_fact(i)
            lines.append(json.dumps({"image": f"{k}.png", "question": q, "answer": a}))
        (folder / "qa.jsonl").write_text("\n".join(lines) + "\n")


def stage_build(args) -> dict:
    t = time.perf_counter()
    ckpt = args.workdir / "ckpt"
    if args.family == "llava":
        build_llava(ckpt, args.vocab)
    else:
        build_qwen2_vl(ckpt, args.vocab, args.image_size)
    write_folder(args.workdir / "forget", (0, 1), args.pictures, seed=1, size=args.image_size)
    write_folder(args.workdir / "retain", (2, 3), args.pictures, seed=2, size=args.image_size)
    index = json.loads((ckpt / "model.safetensors.index.json").read_text())
    return {"build_s": round(time.perf_counter() - t, 1), "peak_rss_mb": _status()["VmHWM"],
            "files": {p.name: p.stat().st_size for p in sorted(ckpt.iterdir())},
            "shards": sorted(set(index["weight_map"].values()))}


# ---------------------------------------------------------------- measuring the job


def _status() -> dict:
    """VmHWM, VmRSS, RssAnon, RssFile of this process, MiB."""
    text = Path("/proc/self/status").read_text()
    return {k: round(int(re.search(rf"^{k}:\s+(\d+) kB", text, re.M).group(1)) / 1024, 1)
            for k in ("VmHWM", "VmRSS", "RssAnon", "RssFile")}


def _reset_peak():
    Path("/proc/self/clear_refs").write_text("5")  # VmHWM := VmRSS (Linux >= 4.0)


class SavedBytes:
    """Bytes each decoder layer's forward saves for backward, per layer call (autograd's saved-tensor
    hooks: the pack hook sees every tensor autograd keeps; it returns it unchanged). Frozen weights are
    not counted; a storage is counted once per forward, in the first layer that saves it (the
    attention mask and rotary tables are shared by the layers)."""

    def __init__(self, detail: bool = False):
        self.detail = detail  # also list each saved tensor (shape, dtype, bytes)
        self.layer = None  # index of the decoder layer running, None outside the layers
        self.seen: set[int] = set()
        self.params: set[int] = set()
        self.calls: list[dict] = []  # one per layer call with grad enabled: layer, tokens, bytes

    def pack(self, t):
        if self.layer is not None and self.calls:
            ptr = t.untyped_storage().data_ptr()
            if ptr not in self.params and ptr not in self.seen:
                self.seen.add(ptr)
                self.calls[-1]["bytes"] += t.untyped_storage().nbytes()
                if self.detail:
                    self.calls[-1].setdefault("tensors", []).append(
                        [list(t.shape), str(t.dtype).replace("torch.", ""), t.untyped_storage().nbytes()])
        return t

    @staticmethod
    def unpack(t):
        return t

    def hook_layers(self, layers):
        import torch

        def before(module, args, kwargs):
            if not torch.is_grad_enabled():
                return
            if module.fastunlearn_layer_index == 0:  # weights may have been cast since the last call
                self.params = {p.untyped_storage().data_ptr() for p in layers.parameters()}
            hidden = args[0] if args else kwargs["hidden_states"]
            self.layer = module.fastunlearn_layer_index
            if self.layer == 0:  # a new forward; a storage saved by several layers (the mask) counts once
                self.seen = set()
            self.calls.append({"layer": self.layer, "tokens": int(hidden.shape[:-1].numel()),
                               "shape": list(hidden.shape[:-1]), "bytes": 0})

        def after(module, args, output):
            self.layer = None

        for i, layer in enumerate(layers):
            layer.fastunlearn_layer_index = i
            layer.register_forward_pre_hook(before, with_kwargs=True)
            layer.register_forward_hook(after)


def stage_apply(args) -> dict:
    import torch

    from fastunlearn import cli, job

    marks = []
    trim = job.trim_heap

    model_ref = [lambda: None]  # a weak reference: the job frees the model before writing

    def trim_and_mark():  # job.phase(): gc.collect(), trim_heap(), then the phase's time is taken
        trim()
        marks.append({**_status(), "model_tensors_mb": _tensor_mb(model_ref[0]())})
        _reset_peak()

    job.trim_heap = trim_and_mark
    saved = SavedBytes()
    open_checkpoint = job.open_checkpoint

    def open_and_hook(*a, **kw):
        loaded = open_checkpoint(*a, **kw)
        saved.hook_layers(_decoder_layers(loaded.model))
        model_ref[0] = weakref.ref(loaded.model)
        return loaded

    job.open_checkpoint = open_and_hook
    out, report = args.workdir / "out", args.workdir / "report.json"
    shutil.rmtree(out, ignore_errors=True)
    argv = ["apply", str(args.workdir / "ckpt"), str(args.workdir / "forget"), "--retain", str(args.workdir / "retain"),
            "--out", str(out), "--report", str(report), "--steps", str(args.steps), "--device", "cpu", *args.extra]
    start = _status()
    _reset_peak()
    t = time.perf_counter()
    with torch.autograd.graph.saved_tensors_hooks(saved.pack, saved.unpack):
        code = cli.main(argv)
    wall = time.perf_counter() - t
    marks.append(_status())
    if code:
        sys.exit(f"fastunlearn apply exited {code}")
    rep = json.loads(report.read_text())
    # job.unlearn's phases in the order they ended (the report's order), then everything after it
    names = [k for k in rep["timing_s"] if k not in ("write", "total")] + ["write"]
    if len(names) != len(marks):
        sys.exit(f"{len(marks)} phase boundaries seen, the report has {names}")
    marks = [{"phase": n, **m} for n, m in zip(names, marks)]
    calls = saved.calls
    if not calls:  # the hooks ride on job.open_checkpoint: a job that loads otherwise escapes them
        sys.exit("no decoder-layer call with gradients was seen")
    biggest = max((c["tokens"] for c in calls), default=0)
    per_layer, shape = {}, None
    for c in calls:
        if c["tokens"] == biggest:
            per_layer.setdefault(c["layer"], c["bytes"])
            shape = c["shape"]
    written = {p.name: p.stat().st_size for p in sorted(out.iterdir())}
    shutil.rmtree(out, ignore_errors=True)  # the copy is not needed once measured
    return {
        "command": "fastunlearn " + " ".join(argv),
        "fastunlearn_source": str(Path(cli.__file__).parent),
        "wall_s": round(wall, 1),
        "rss_before_job_mb": start,
        "phases": marks,
        "phases_s": rep["timing_s"],
        "peak_rss_mb": max(m["VmHWM"] for m in marks),
        # getrusage's maximum follows the same counter this script resets: not the job's peak here
        "report_peak_memory_mb_after_resets": rep["peak_memory_mb"],
        "step_s": round(rep["timing_s"]["optimise"] / args.steps, 1),
        "losses": rep["loss_curve"],
        "mask_density": rep["mask_density"],
        "changed_tensors": [{k: c[k] for k in ("name", "file", "byte_range", "dtype", "shape", "elements_changed")}
                            for c in rep["changed_tensors"]],
        "bytes_written": rep["byte_proof"]["bytes_written"],
        "all_other_bytes_unchanged": rep["byte_proof"]["all_other_bytes_unchanged"],
        "out_files_bytes": sum(written.values()),
        "forget_items": rep["metrics"]["forget"]["before"]["items"],
        # the padded length of a pass: the prompts are the same, answers differ by a few tokens
        "sequence_tokens": max((c["shape"][-1] for c in calls), default=0),
        "saved_for_backward": {"pass_tokens": biggest, "pass_shape": shape, "per_layer_bytes": per_layer,
                               "grad_layer_calls": len(calls)},
    }


def _tensor_mb(model) -> dict:
    """MiB of the model's parameters and buffers by dtype (each storage once; a storage mapped from a
    safetensors file counts here whether or not its pages are resident)."""
    if model is None:
        return {}
    seen, out = set(), {}
    for t in [*model.parameters(), *model.buffers()]:
        storage = t.untyped_storage()
        if storage.data_ptr() in seen:
            continue
        seen.add(storage.data_ptr())
        key = str(t.dtype).replace("torch.", "")
        out[key] = out.get(key, 0) + storage.nbytes()
    return {k: round(v / 2**20, 1) for k, v in sorted(out.items())}


def _decoder_layers(model):
    inner = model.model
    lm = getattr(inner, "language_model", getattr(inner, "text_model", None))
    return lm.layers


# ---------------------------------------------------------------- decoder layers alone, bf16 and fp32


def stage_probe(args) -> dict:
    import torch

    config = json.loads((args.workdir / "ckpt" / "config.json").read_text())
    tokens = args.probe_tokens
    out = {"tokens_per_sequence": tokens, "sequences": 2}
    for dtype in (torch.bfloat16, torch.float32):
        model = _one_layer_lm(args.family, args.workdir / "ckpt", dtype)
        h = model.config.hidden_size
        saved = SavedBytes(detail=True)
        saved.hook_layers(model.layers)
        embeds = (torch.randn(2, tokens, h) * 0.02).to(dtype).requires_grad_(True)
        mask = torch.ones(2, tokens, dtype=torch.long)
        mask[1, -7:] = 0  # right padding, as the job's batches: sdpa gets a mask
        t = time.perf_counter()
        with torch.autograd.graph.saved_tensors_hooks(saved.pack, saved.unpack):
            hidden = model(inputs_embeds=embeds, attention_mask=mask, use_cache=False).last_hidden_state
        hidden.float().square().mean().backward()
        first, second = saved.calls[0], saved.calls[1]
        out[str(dtype).replace("torch.", "")] = {
            # the second layer's: what each further layer adds
            "saved_bytes_per_token": round(second["bytes"] / (2 * tokens), 1),
            "saved_per_token_over_hidden": round(second["bytes"] / (2 * tokens) / h, 2),
            "shared_bytes_per_token": round((first["bytes"] - second["bytes"]) / (2 * tokens), 1),
            "fwd_bwd_s": round(time.perf_counter() - t, 1),
            "tensors": first.get("tensors", [])}
        del model, hidden, embeds
    out["config_text"] = {k: config.get("text_config", {}).get(k) for k in
                          ("hidden_size", "intermediate_size", "num_attention_heads", "num_key_value_heads")}
    return out


def _one_layer_lm(family: str, ckpt: Path, dtype):
    """The family's text model class, two decoder layers, random frozen weights, the checkpoint's width."""
    import torch
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(ckpt).text_config
    config.num_hidden_layers, config.vocab_size = 2, 256
    if family == "llava":
        from transformers import LlamaModel as cls
    else:
        from transformers.models.qwen2_vl.modeling_qwen2_vl import Qwen2VLTextModel as cls
    torch.manual_seed(0)
    return cls(config).to(dtype).eval().requires_grad_(False)


# ---------------------------------------------------------------- deriving the real depth


def stored_sizes(ckpt: Path) -> dict:
    """Bytes stored (bf16) per part: one decoder layer, one vision layer, embeddings, lm_head, projector, rest."""
    from fastunlearn import safetensors_io as st

    parts: dict[str, int] = {}
    text_layers, vision_layers = set(), set()
    for name, info in st.read_checkpoint(ckpt).items():
        n = info.end - info.start
        v = re.search(r"(?:vision_tower\.(?:vision_model\.)?encoder\.layers|visual\.blocks)\.(\d+)\.", name)
        m = re.search(r"(?:^|\.)layers\.(\d+)\.", name)
        if v:
            key, _ = "vision_layers", vision_layers.add(v.group(1))
        elif m:
            key, _ = "text_layers", text_layers.add(m.group(1))
        elif "multi_modal_projector" in name or "visual.merger" in name:
            key = "projector"
        elif "embed_tokens" in name:
            key = "embed_tokens"
        elif "lm_head" in name:
            key = "lm_head"
        elif "vision_tower" in name or "visual." in name:
            key = "vision_other"
        else:
            key = "text_other"
        parts[key] = parts.get(key, 0) + n
    parts["text_layer"] = parts.pop("text_layers") // len(text_layers)
    parts["vision_layer"] = parts.pop("vision_layers") // len(vision_layers)
    return parts


def derive(family: str, sizes: dict, apply: dict, probe: dict, tokens: int, image_tokens: int) -> dict:
    """The model at its real depth, from the per-layer figures. GB = 1e9 bytes, as in the README.

    GPU (bf16; estimated): stored weights at the real depth; the projector state at the README's 29
    bytes a parameter, and while the Fisher pass runs its 8 copies of the projector with their
    gradients (64 bytes a parameter); activations = sequences held at once x tokens x layers x the
    bf16 bytes a token one more layer saves (probe): one process holds a pass of STEP_PASS["cuda"]
    sequences, a torchrun rank its whole share of the step's 16 + 16 (16 on 2 ranks). At the measured
    sequence length and at the README's (LLaVA: 640 tokens; Qwen2-VL: a 1024-token picture).
    CPU (fp32; extrapolated from this run): each phase's measured peak plus, per further layer, its
    fp32 weights and, in the phases with a backward (mask, optimise), what it saves for a CPU pass of
    STEP_PASS["cpu"] sequences (probe, fp32)."""
    from fastunlearn.optimise import STEP_PASS

    assert STEP_PASS == PASS, STEP_PASS
    depth = REAL_DEPTH[family]
    gb, L = 1e9, depth["text"]
    layers = L * sizes["text_layer"]
    vision = depth["vision"] * sizes["vision_layer"] + sizes.get("vision_other", 0)
    embed_head = sizes["embed_tokens"] + sizes["lm_head"] + sizes.get("text_other", 0)
    params = sizes["projector"] / 2  # stored in bf16
    readme_tokens = 640 if family == "llava" else tokens - image_tokens + 1024
    per_token = {d: probe[d]["saved_bytes_per_token"] for d in ("bfloat16", "float32")}
    out = {"decoder_layers": L, "vision_layers": depth["vision"], "tokens_per_sequence": tokens,
           "readme_tokens_per_sequence": readme_tokens, "projector_params_M": round(params / 1e6, 1),
           "gpu_bf16": {"decoder_layers_GB": round(layers / gb, 2), "embed_lm_head_GB": round(embed_head / gb, 2),
                        "vision_tower_GB": round(vision / gb, 2), "projector_GB": round(sizes["projector"] / gb, 3),
                        "projector_state_GB": round(29 * params / gb, 2),
                        "fisher_copies_GB": round(PASS["cuda"] * 8 * params / gb, 2),
                        "saved_per_token_per_layer_bytes": per_token["bfloat16"]}}
    weights = layers + vision + embed_head + sizes["projector"]
    for label, n in (("measured", tokens), ("readme", readme_tokens)):
        one = per_token["bfloat16"] * n * L
        out["gpu_bf16"][f"activations_1_process_{label}_tokens_GB"] = round(PASS["cuda"] * one / gb, 1)
        out["gpu_bf16"][f"activations_2_ranks_{label}_tokens_GB"] = round(16 * one / gb, 1)
        out["gpu_bf16"][f"total_1_process_{label}_tokens_GB"] = round(
            (weights + 29 * params + PASS["cuda"] * one + 2e9) / gb, 1)
        out["gpu_bf16"][f"total_2_ranks_{label}_tokens_GB"] = round((weights + 29 * params + 16 * one + 2e9) / gb, 1)
    # the CPU job as it ran: does it keep the input embeddings as stored (bf16 left after the cast)?
    cached = next(m for m in apply["phases"] if m["phase"] == "cache")
    kept = "bfloat16" in cached.get("model_tensors_mb", {})
    fp32_layer = 2 * sizes["text_layer"]
    cpu_pass = PASS["cpu"] * tokens * per_token["float32"]
    held = 2 * (layers + sizes["lm_head"]) + sizes["embed_tokens"] * (1 if kept else 2)
    cpu = {"llm_as_held_GB": round(held / gb, 2),
           "input_embeddings": "kept as stored (bf16)" if kept else "cast to fp32",
           "saved_per_token_per_layer_bytes": per_token["float32"], "phases_GB": {}}
    for m in apply["phases"]:
        if m["phase"] in ("load", "answers", "write"):
            continue  # before the LLM is cast, and after it is freed
        extra = (L - 2) * (fp32_layer + (cpu_pass if m["phase"] in ("mask", "optimise") else 0))
        cpu["phases_GB"][m["phase"]] = round((m["VmHWM"] * 2**20 + extra) / gb, 1)
    cpu["peak_GB"] = max(cpu["phases_GB"].values())
    out["cpu_fp32"] = cpu
    measured = apply["saved_for_backward"]
    if measured["per_layer_bytes"]:
        first = measured["per_layer_bytes"].get(0) or measured["per_layer_bytes"].get("0")
        out["job_fp32_saved_per_token_layer0_bytes"] = round(first / measured["pass_tokens"], 1)
    return out


def rederive(path: Path) -> dict:
    """`real_depth` again from a result JSON this script wrote (its per-layer figures and stored sizes)."""
    result = json.loads(path.read_text())
    image_tokens = 576 if result["family"] == "llava" else (result["image_size"] // 28) ** 2
    result["real_depth"] = derive(result["family"], result["stored_bytes"], result["apply"], result["probe"],
                                  result["probe"]["tokens_per_sequence"], image_tokens)
    return result


# ---------------------------------------------------------------- driver


def run_stage(stage: str, args) -> dict:
    result = args.workdir / f"{stage}.json"
    cmd = [sys.executable, str(HERE), "--stage", stage, "--family", args.family, "--pictures", str(args.pictures),
           "--steps", str(args.steps), "--workdir", str(args.workdir), "--json", str(result),
           "--image-size", str(args.image_size), "--vocab", str(args.vocab), "--probe-tokens", str(args.probe_tokens)]
    if args.extra:
        cmd += ["--extra", *args.extra]
    t = time.perf_counter()
    subprocess.run(cmd, check=True)
    data = json.loads(result.read_text())
    print(f"[{stage}] {time.perf_counter() - t:.0f} s", flush=True)
    return data


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--family", choices=("llava", "qwen2_vl"))
    ap.add_argument("--pictures", type=int, default=8, help="pictures in the forget folder and in the retain folder")
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--workdir", type=Path, default=None, help="default: a new temporary folder")
    ap.add_argument("--json", type=Path, default=None)
    ap.add_argument("--image-size", type=int, default=None, help="pictures' side in pixels (LLaVA: 336; Qwen2-VL: 448)")
    ap.add_argument("--vocab", type=int, default=None, help="default: the 7B model's (32064; 152064)")
    ap.add_argument("--probe-tokens", type=int, default=0, help="sequence length of the layer probe "
                    "(default: the job's longest sequence)")
    ap.add_argument("--keep", action="store_true", help="keep the work folder")
    ap.add_argument("--rederive", type=Path, default=None, help="recompute the real-depth figures of a result JSON "
                    "(written back to --json, or printed)")
    ap.add_argument("--stage", choices=("build", "apply", "probe"), help=argparse.SUPPRESS)
    ap.add_argument("--extra", nargs=argparse.REMAINDER, default=[], help="more options for `fastunlearn apply`")
    args = ap.parse_args()
    if args.rederive:
        result = rederive(args.rederive)
        print(json.dumps(result["real_depth"], indent=2))
        if args.json:
            args.json.write_text(json.dumps(result, indent=2) + "\n")
        return
    if args.family is None:
        ap.error("--family is required")
    args.image_size = args.image_size or (336 if args.family == "llava" else 448)
    args.vocab = args.vocab or (32064 if args.family == "llava" else 152064)

    if args.stage:
        os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
        result = {"build": stage_build, "apply": stage_apply, "probe": stage_probe}[args.stage](args)
        args.json.write_text(json.dumps(result, indent=2))
        return

    made = args.workdir is None
    args.workdir = Path(tempfile.mkdtemp(prefix=f"real-width-{args.family}-")) if made else args.workdir
    args.workdir.mkdir(parents=True, exist_ok=True)
    try:
        import torch

        t = time.perf_counter()
        build = run_stage("build", args)
        apply = run_stage("apply", args)
        args.probe_tokens = args.probe_tokens or apply["sequence_tokens"]
        probe = run_stage("probe", args)
        sizes = stored_sizes(args.workdir / "ckpt")
        result = {
            "family": args.family, "pictures": args.pictures, "steps": args.steps, "image_size": args.image_size,
            "vocab": args.vocab, "date_utc": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
            "machine": {"cpus": os.cpu_count(), "cpu": _cpu_name(), "platform": platform.platform(),
                        "torch": torch.__version__, "threads": torch.get_num_threads()},
            "build": build, "apply": apply, "probe": probe, "stored_bytes": sizes,
            "real_depth": derive(args.family, sizes, apply, probe, args.probe_tokens,
                                 576 if args.family == "llava" else (args.image_size // 28) ** 2),
            "wall_s": round(time.perf_counter() - t, 1),
        }
        print(json.dumps(result, indent=2))
        if args.json:
            args.json.write_text(json.dumps(result, indent=2) + "\n")
    finally:
        if made and not args.keep:
            shutil.rmtree(args.workdir, ignore_errors=True)


def _cpu_name() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor()


if __name__ == "__main__":
    main()
