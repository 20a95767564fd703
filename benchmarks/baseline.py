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
                 device: torch.device, dtype=torch.float32, retain_weight: float = 3.0, out=None) -> list[float]:
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
            loss = loss + retain_weight * sequence_nll(model(**r_inputs).logits, r_labels).sum() / (r_labels != -100).sum()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(float(loss.detach()))
    if out is not None:  # what a published baseline ends with: the whole model saved
        model.save_pretrained(out)
        processor.save_pretrained(out)
    return losses


def main() -> None:
    """The naive job as a whole process: python benchmarks/baseline.py CKPT FORGET RETAIN [--steps N] ..."""
    import argparse
    from pathlib import Path

    from fastunlearn.data import read_folder

    ap = argparse.ArgumentParser(description=main.__doc__)
    ap.add_argument("ckpt", type=Path)
    ap.add_argument("forget", type=Path)
    ap.add_argument("retain", type=Path)
    ap.add_argument("--steps", type=int, default=100)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--lr", type=float, default=1e-2)
    ap.add_argument("--beta", type=float, default=0.5)
    ap.add_argument("--retain-weight", type=float, default=3.0)
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.float32 if device.type == "cpu" else torch.bfloat16
    run_baseline(args.ckpt, read_folder(args.forget, "forget"), read_folder(args.retain, "retain"), args.steps, args.lr,
                 args.beta, args.batch_size, device, dtype, args.retain_weight, args.out)


if __name__ == "__main__":
    main()
