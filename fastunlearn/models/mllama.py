"""Llama 3.2 Vision checkpoints (model_type "mllama"): tiled vision encoder (final and intermediate layers
concatenated) -> one Linear -> cross-attention layers of the Llama LLM.

Connector: `multi_modal_projector.{weight,bias}`. The projected tiles do not replace placeholder
tokens: they enter the LLM as `cross_attention_states` ([pictures x max tiles, patches, hidden]), and
`cross_attention_mask` (built with the processor's own functions) lets the tokens from the
`<|image|>` token on attend to the picture's real tiles. A text-only sequence in a batch with pictures
gets zero states and an all-zero mask row, which the model masks out. One picture per sequence.
Features: the vision model's last hidden state, every tile of max_num_tiles (padding tiles included,
as the model computes them)."""
from __future__ import annotations

import torch

from ..errors import UserError
from .common import ProcessorAdapter, call


class _Tower:
    """Stands in for the freed vision model: the forward reads only its patch count."""

    def __init__(self, num_patches):
        self.num_patches = num_patches


class MllamaAdapter(ProcessorAdapter):
    family = "mllama"
    model_types = ("mllama",)
    processor_class = "MllamaProcessor"
    processor_module = "mllama"
    feature_keys = ("pixel_values", "aspect_ratio_ids", "aspect_ratio_mask")

    def patches(self, model):
        vision = model.config.vision_config
        return (vision.image_size // vision.patch_size) ** 2 + 1

    def drop_vision_tower(self, model):
        if isinstance(model.model.vision_model, torch.nn.Module):
            del model.model.vision_model
            model.model.vision_model = _Tower(self.patches(model))

    def tower_stack(self, model):
        raise UserError("--scope vision:K: an mllama connector reads several tower layers (the local encoder's "
                        "intermediate layers beside the global encoder's output), so there are no last K layers its "
                        "features pass through; use --scope connector")

    @torch.no_grad()
    def vision_features(self, model, pixel):
        out = model.model.vision_model(**self.feature_inputs(model, pixel)).last_hidden_state
        return out.reshape(-1, out.shape[-1])  # [max tiles x patches, vision_output_dim]

    def project_images(self, model, params, features, grids):
        module = self.projector_module(model)
        return [call(module, params, "", f) for f in features]

    def connector_ignored(self, model):
        gates = [p for n, p in model.named_parameters() if n.endswith(("cross_attn_attn_gate", "cross_attn_mlp_gate"))]
        if gates and all(not g.any() for g in gates):
            return (super().connector_ignored(model) + " (every cross-attention gate, cross_attn_attn_gate and "
                    "cross_attn_mlp_gate, is 0 as in a freshly initialised model, so pictures never reach the LLM: "
                    "use a trained checkpoint)")
        return super().connector_ignored(model)

    def cross_attention_mask(self, model, input_ids, grids):
        from transformers.models.mllama.processing_mllama import (convert_sparse_cross_attention_mask_to_dense,
                                                                  get_cross_attention_token_mask)

        token = model.config.image_token_index
        sparse = [get_cross_attention_token_mask(row.tolist(), token) for row in input_ids.cpu()]
        tiles = [[int(t) for t in grid["num_tiles"][0]] if grid is not None else [] for grid in grids]
        dense = convert_sparse_cross_attention_mask_to_dense(sparse, tiles, model.config.vision_config.max_num_tiles,
                                                             input_ids.shape[1])
        return torch.as_tensor(dense, device=input_ids.device)

    def model_inputs(self, model, input_ids, attention_mask, grids, answer_starts):
        if all(g is None for g in grids):
            return {}
        return {"cross_attention_mask": self.cross_attention_mask(model, input_ids, grids)}

    def connector_inputs(self, model, params, features, grids, inputs=None):
        hidden, patches = model.config.text_config.hidden_size, self.patches(model)
        projected = [p.reshape(-1, patches, hidden) for p in self.project_each(model, params, features, grids)]
        rows = inputs["cross_attention_mask"].flatten(1).any(-1)  # the sequences with a picture, in order
        states = projected[0].new_zeros(len(rows), *projected[0].shape)
        states[rows.to(states.device)] = torch.stack(projected)
        return {"cross_attention_states": states.flatten(0, 1).to(model.dtype)}

    def generate_inputs(self, model, input_ids, pixel):
        inputs = super().generate_inputs(model, input_ids, pixel)
        if pixel is not None:
            inputs["cross_attention_mask"] = self.cross_attention_mask(model, input_ids[None], [pixel])
        return inputs
