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
    """Final hidden states at the positions that predict answer tokens, [answer tokens, H]."""
    model = loaded.model
    embeds = model.get_input_embeddings()(batch.input_ids).to(model.get_output_embeddings().weight.dtype)
    if batch.features is not None:
        projected = project(loaded, params, batch)
        n_slots = int(batch.image_mask.sum())
        if projected.shape[0] != n_slots:
            raise UserError(f"the prompt has {n_slots} image tokens but the projector made {projected.shape[0]}")
        embeds = embeds.masked_scatter(batch.image_mask[..., None], projected.to(embeds.dtype))
    out = model.model.language_model(
        inputs_embeds=embeds, attention_mask=batch.attention_mask, position_ids=batch.position_ids, use_cache=False
    )
    hidden = out.last_hidden_state
    return hidden.reshape(-1, hidden.shape[-1])[batch.answer_rows]


def project(loaded: Loaded, params, batch: Batch) -> torch.Tensor:
    """The projector on the batch's features, [image tokens, H]. `params` is one parameter dict,
    or a list of them, one per sequence (per-sample gradients: mask.py): sequence b's features
    then go through params[b] only, so d(sum of NLLs)/d params[b] is sequence b's own gradient."""
    features = batch.features.to(torch.float32)
    if isinstance(params, dict):
        return loaded.adapter.project(params, features)
    tokens = batch.image_mask.sum(1)
    rows = (tokens * (features.shape[0] // max(1, int(tokens.sum())))).tolist()  # feature rows per sequence
    parts = features.split(rows)
    return torch.cat([loaded.adapter.project(p, f) for p, f in zip(params, parts) if f.shape[0]])


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
