"""The straightforward projector-only NPO job a user would write with Hugging Face transformers
(DESIGN.md §7): the HF model's own forward at every step (vision tower included), full-vocab
logits at every position, a deep-copied frozen reference model run every step, torch AdamW on the
projector. Same data, objective and number of steps as fastunlearn's job; used only as the
benchmark baseline.
"""
from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from transformers import AutoModelForImageTextToText

from fastunlearn.data import load_image
from fastunlearn.models import adapter_for
from fastunlearn.objectives import npo


def sequence_nll(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    logp = F.log_softmax(logits[:, :-1].float(), dim=-1)
    targets = labels[:, 1:]
    mask = targets != -100
    picked = logp.gather(-1, targets.clamp(min=0)[..., None])[..., 0]
    return -(picked * mask).sum(-1)


def encode_batch(adapter, processor, model, items, device):
    """HF-style inputs: padded ids, attention mask, pixel values, labels (-100 outside the answers)."""
    encoded, pixels = [], []
    for item in items:
        pixel = adapter.pixel_inputs(processor, load_image(item.image))
        encoded.append(adapter.encode(processor, model.config, pixel, item.question, item.answer))
        pixels.append(pixel["pixel_values"])
    length = max(len(e.input_ids) for e in encoded)
    pad = processor.tokenizer.pad_token_id or 0
    ids = torch.full((len(items), length), pad)
    labels = torch.full((len(items), length), -100)
    mask = torch.zeros((len(items), length), dtype=torch.long)
    for b, e in enumerate(encoded):
        ids[b, : len(e.input_ids)] = e.input_ids
        labels[b, e.answer_start : len(e.input_ids)] = e.input_ids[e.answer_start :]
        mask[b, : len(e.input_ids)] = 1
    return {"input_ids": ids.to(device), "attention_mask": mask.to(device),
            "pixel_values": torch.cat(pixels).to(device, model.dtype)}, labels.to(device)


def run_baseline(ckpt, forget_items, retain_items, steps: int, lr: float, beta: float, batch_size: int,
                 device: torch.device, dtype=torch.float32) -> list[float]:
    model = AutoModelForImageTextToText.from_pretrained(ckpt, dtype=dtype).to(device).eval()
    adapter = adapter_for(model.config.model_type)
    processor = adapter.load_processor(ckpt)
    reference = copy.deepcopy(model).requires_grad_(False)
    model.requires_grad_(False)
    projector = list(adapter.projector_module(model).parameters())
    for p in projector:
        p.requires_grad_(True)
    optimizer = torch.optim.AdamW(projector, lr=lr, weight_decay=0.0)
    forget = [encode_batch(adapter, processor, model, forget_items[i : i + batch_size], device)
              for i in range(0, len(forget_items), batch_size)]
    retain = [encode_batch(adapter, processor, model, retain_items[i : i + batch_size], device)
              for i in range(0, len(retain_items), batch_size)]
    losses = []
    for step in range(steps):
        inputs, labels = forget[step % len(forget)]
        nll = sequence_nll(model(**inputs).logits, labels)
        with torch.no_grad():
            ref_nll = sequence_nll(reference(**inputs).logits, labels)
        loss = npo(nll, ref_nll, beta)
        if retain:
            r_inputs, r_labels = retain[step % len(retain)]
            loss = loss + sequence_nll(model(**r_inputs).logits, r_labels).sum() / (r_labels != -100).sum()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(float(loss.detach()))
    return losses
