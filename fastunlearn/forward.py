"""Batch -> projector -> frozen LLM -> per-sequence answer NLL.

Only the projector is a function of the trained parameters; its output is scattered into the
image placeholder positions, the frozen LLM runs, and only the hidden states that predict answer
tokens reach the lm_head (`linear_nll`: logits are never materialised)."""
from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from .batches import Batch
from .errors import UserError
from .kernels import linear_nll

if TYPE_CHECKING:
    from .load import Loaded


def answer_hidden(loaded: Loaded, params: dict[str, torch.Tensor], batch: Batch) -> torch.Tensor:
    """Final hidden states at the positions that predict answer tokens, [answer tokens, H].

    The one place where projected tokens enter the frozen LLM: the adapter turns the cached features
    into the connector's outputs (`connector_inputs`, a function of `params`), and the family's own
    multimodal forward (`model.model`) places them (placeholder scatter, or cross-attention states),
    with its own attention masks and position ids."""
    model = loaded.model
    inputs = dict(batch.model_inputs)
    if batch.features is not None:
        features = list(batch.features.to(torch.float32).split(batch.feature_sizes))
        inputs.update(loaded.adapter.connector_inputs(model, params, features, batch.grids, batch.model_inputs))
        image = inputs.get("mm_encoder_outputs", {}).get("image")
        if image is not None:
            parts = image.pooler_output if isinstance(image.pooler_output, (list, tuple)) else [image.pooler_output]
            n_tokens, n_slots = sum(p.numel() // p.shape[-1] for p in parts), int(batch.image_mask.sum())
            if n_tokens != n_slots:
                raise UserError(f"the prompt has {n_slots} image tokens but the projector made {n_tokens}")
    out = model.model(input_ids=batch.input_ids, attention_mask=batch.attention_mask, use_cache=False, **inputs)
    hidden = out.last_hidden_state
    return hidden.reshape(-1, hidden.shape[-1])[batch.answer_rows]


def sequence_nll(loaded: Loaded, params, batch: Batch) -> torch.Tensor:
    """Per-sequence sum of answer-token NLLs, [B], float32."""
    hidden = answer_hidden(loaded, params, batch)
    lm_head = loaded.model.get_output_embeddings().weight
    token_nll = linear_nll(hidden, lm_head, batch.targets)
    return torch.zeros(len(batch.lengths), device=hidden.device).index_add(0, batch.answer_seq, token_nll)


@torch.no_grad()
def score(loaded: Loaded, params, batches: list[Batch]) -> dict:
    """Per-sequence answer NLL and greedy exact match (every answer token is the argmax)."""
    nll, correct = [], []
    lm_head = loaded.model.get_output_embeddings().weight
    for batch in batches:
        hidden = answer_hidden(loaded, params, batch)
        logits = (hidden @ lm_head.T).float()
        token_nll = torch.nn.functional.cross_entropy(logits, batch.targets, reduction="none")
        wrong = (logits.argmax(-1) != batch.targets).float()
        B = len(batch.lengths)
        nll.append(torch.zeros(B, device=hidden.device).index_add(0, batch.answer_seq, token_nll))
        correct.append(torch.zeros(B, device=hidden.device).index_add(0, batch.answer_seq, wrong) == 0)
    if not batches:
        return {"nll": torch.zeros(0), "correct": torch.zeros(0, dtype=torch.bool)}
    return {"nll": torch.cat(nll).cpu(), "correct": torch.cat(correct).cpu()}


def summarize(scores: dict, batches: list[Batch]) -> dict:
    tokens = float(sum(b.lengths.sum().item() for b in batches))
    n = len(scores["correct"])
    return {
        "items": n,
        "answer_tokens": int(tokens),
        "mean_token_nll": round(float(scores["nll"].sum()) / max(tokens, 1), 6),
        "greedy_accuracy": round(float(scores["correct"].float().mean()) if n else 0.0, 6),
    }
