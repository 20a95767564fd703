"""Batch -> projector -> frozen LLM -> per-sequence answer NLL.

Only the projector is a function of the trained parameters; its output is scattered into the
image placeholder positions, the frozen LLM runs, and only the hidden states that predict answer
tokens reach the lm_head (`linear_nll`: logits are never materialised)."""
from __future__ import annotations

import contextlib
from typing import TYPE_CHECKING

import torch

from .batches import Batch, _batch
from .errors import UserError
from .kernels.linear_nll import linear_nll
from .ranks import ONE_PROCESS, Ranks

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
    with answer_rows_only(model, batch.answer_rows, batch.input_ids.numel()):
        out = model.model(input_ids=batch.input_ids, attention_mask=batch.attention_mask, use_cache=False, **inputs)
    hidden = out.last_hidden_state
    return hidden.reshape(-1, hidden.shape[-1])[batch.answer_rows]


PER_TOKEN_PARTS = ("self_attn.q_proj", "self_attn.o_proj", "mlp")  # of the last decoder layer


@contextlib.contextmanager
def answer_rows_only(model, rows: torch.Tensor, n_rows: int):
    """Only the hidden states at `rows` (flat over [B*L]) leave the LLM's last decoder layer for the
    lm_head, and the final norm is per token: so in that layer the per-token parts (the query and
    output projections of its attention, its MLP) run on those rows alone, with zeros elsewhere; the
    keys and values still see every position. Exact at `rows`; ~80% of the last layer's work saved,
    forward and backward. A part whose input is not one row per token is left whole; nothing changes
    for a layer wrapped for activation checkpointing (its backward reruns the forward unhooked)."""
    layer = last_decoder_layer(model)
    if layer is None or hasattr(layer, "_checkpoint_wrapped_module"):
        yield
        return
    handles = []
    for name in PER_TOKEN_PARTS:
        part = layer.get_submodule(name) if _has(layer, name) else None
        if part is not None:
            handles += _rows_only(part, rows, n_rows)
    try:
        yield
    finally:
        for h in handles:
            h.remove()


def last_decoder_layer(model) -> torch.nn.Module | None:
    inner = model.model
    lm = getattr(inner, "language_model", getattr(inner, "text_model", None))
    layers = getattr(lm, "layers", None)
    return layers[-1] if isinstance(layers, torch.nn.ModuleList) and len(layers) else None


def _has(module: torch.nn.Module, name: str) -> bool:
    try:
        module.get_submodule(name)
        return True
    except AttributeError:
        return False


def _rows_only(part: torch.nn.Module, rows: torch.Tensor, n_rows: int) -> list:
    """Hooks that run `part` on rows `rows` of its [B, L, D] input and scatter its output back."""
    shapes = []

    def gather(module, args):
        x = args[0]
        if not isinstance(x, torch.Tensor) or x.shape[:-1].numel() != n_rows:
            shapes.append(None)
            return None
        shapes.append(x.shape[:-1])
        return (x.reshape(n_rows, x.shape[-1])[rows][None], *args[1:])

    def scatter(module, args, output):
        shape = shapes.pop()
        if shape is None:
            return None
        first = output[0] if isinstance(output, tuple) else output  # (hidden states, router logits) of an MoE
        full = first.new_zeros(n_rows, first.shape[-1]).index_copy(0, rows, first[0]).reshape(*shape, first.shape[-1])
        return (full, *output[1:]) if isinstance(output, tuple) else full

    return [part.register_forward_pre_hook(gather), part.register_forward_hook(scatter)]


def lm_head_input(loaded: Loaded, params, batch: Batch) -> torch.Tensor:
    """answer_hidden times the family's logit scale: (s h) W^T = s (h W^T), so the NLLs are those of the
    model's own logits without a scaled [tokens, vocab] product."""
    hidden = answer_hidden(loaded, params, batch)
    scale = loaded.adapter.logit_scale(loaded.model)
    return hidden if scale == 1.0 else hidden * scale


def sequence_nll(loaded: Loaded, params, batch: Batch) -> torch.Tensor:
    """Per-sequence sum of answer-token NLLs, [B], float32."""
    hidden = lm_head_input(loaded, params, batch)
    lm_head = loaded.model.get_output_embeddings().weight
    token_nll = linear_nll(hidden, lm_head, batch.targets)
    return torch.zeros(len(batch.lengths), device=hidden.device).index_add(0, batch.answer_seq, token_nll)


@torch.no_grad()
def score(loaded: Loaded, params, batches: list[Batch], ranks: Ranks = ONE_PROCESS) -> dict:
    """Per-sequence answer NLL and greedy exact match (every answer token is the argmax) of this
    rank's sequences."""
    nll, correct = [], []
    lm_head = loaded.model.get_output_embeddings().weight
    for batch in batches:
        if not batch.samples:  # none of this rank's; with a sharded LLM, a stand-in makes the same calls
            for stand_in in ranks.stand_ins(0, 1):
                lm_head_input(loaded, params, _batch(loaded, [stand_in]))
            continue
        hidden = lm_head_input(loaded, params, batch)
        logits = (hidden @ lm_head.T).float()
        token_nll = torch.nn.functional.cross_entropy(logits, batch.targets, reduction="none")
        wrong = (logits.argmax(-1) != batch.targets).float()
        B = len(batch.lengths)
        nll.append(torch.zeros(B, device=hidden.device).index_add(0, batch.answer_seq, token_nll))
        correct.append(torch.zeros(B, device=hidden.device).index_add(0, batch.answer_seq, wrong) == 0)
    if not nll:
        return {"nll": torch.zeros(0), "correct": torch.zeros(0, dtype=torch.bool)}
    return {"nll": torch.cat(nll).cpu(), "correct": torch.cat(correct).cpu()}


def summarize(scores: dict, batches: list[Batch], ranks: Ranks = ONE_PROCESS, part: slice = slice(None)) -> dict:
    """The metrics of the sequences `part` of the list `batches` was made from (make_batches), every
    rank's scores (`score`) gathered in its order."""
    mine = zip([p for b in batches for p in b.positions], scores["nll"].tolist(), scores["correct"].tolist(),
               [n for b in batches for n in b.lengths.tolist()])
    rows = sorted(row for theirs in ranks.gather(list(mine), "gathering the metrics") for row in theirs)[part]
    nll = torch.tensor([x for _, x, _, _ in rows], dtype=torch.float32)
    correct = torch.tensor([c for _, _, c, _ in rows], dtype=torch.bool)
    tokens = float(sum(n for _, _, _, n in rows))
    return {
        "items": len(rows),
        "answer_tokens": int(tokens),
        "mean_token_nll": round(float(nll.sum()) / max(tokens, 1), 6),
        "greedy_accuracy": round(float(correct.float().mean()) if rows else 0.0, 6),
    }
