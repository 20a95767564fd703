"""PaliGemma checkpoints (model_type "paligemma"): SigLIP (after its post-LayerNorm) -> one Linear -> Gemma.

Connector: `multi_modal_projector.linear.{weight,bias}`. Prompts as PaliGemmaProcessor builds them
(no chat template): `<image>` x image_seq_length, then bos, the question and a newline; the answer
follows. `token_type_ids` mark the prefix (0: picture and question, attended bidirectionally) and
the answer (1: causal), as the processor's suffix does; positions are 1-indexed by the model.
`--scope vision:K`: the last K of SigLIP's layers, then its post-LayerNorm as stored."""
from __future__ import annotations

import torch

from .common import SiglipAdapter


class PaliGemmaAdapter(SiglipAdapter):
    family = "paligemma"
    model_types = ("paligemma",)
    processor_class = "PaliGemmaProcessor"
    processor_module = "paligemma"
    pooler_output_tensor = True
    batch_views = True

    def prompt(self, processor, question, with_image):
        bos = processor.tokenizer.bos_token or ""
        return f"{processor.image_token if with_image else ''}{bos}{question}\n"

    def model_inputs(self, model, input_ids, attention_mask, grids, answer_starts):
        token_type_ids = torch.zeros_like(input_ids)
        for row, start in enumerate(answer_starts):
            token_type_ids[row, start:] = attention_mask[row, start:]
        return {"token_type_ids": token_type_ids}

    def generate_inputs(self, model, input_ids, pixel):
        inputs = super().generate_inputs(model, input_ids, pixel)
        inputs["token_type_ids"] = torch.zeros_like(inputs["input_ids"])
        return inputs
