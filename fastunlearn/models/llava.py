"""LLaVA-1.5 style checkpoints (model_type "llava"): CLIP tower -> Linear, GELU, Linear -> Llama-style LLM.

Stored projector: multi_modal_projector.linear_1.{weight,bias}, multi_modal_projector.linear_2.{weight,bias}.
Vision features: hidden states of `vision_feature_layer` (an int, or a list concatenated on the
feature axis), CLS token dropped under the "default" select strategy.
"""
from __future__ import annotations

import torch
from transformers import AutoProcessor

from ..errors import UserError
from ..kernels import projector_mlp
from . import Adapter


class LlavaAdapter(Adapter):
    family = "llava"
    model_types = ("llava",)
    projector_prefix = "multi_modal_projector."
    answer_separator = " "

    def load_processor(self, ckpt):
        return AutoProcessor.from_pretrained(ckpt)

    def projector_module(self, model):
        return model.model.multi_modal_projector

    def check_config(self, config):
        if config.projector_hidden_act != "gelu":
            raise UserError(f"projector activation {config.projector_hidden_act!r} is not supported (gelu is)")

    def default_prompt(self, question, with_image):
        return f"USER: {'<image>' + chr(10) if with_image else ''}{question} ASSISTANT:"

    def n_image_tokens(self, processor, model_config, pixel):
        # as LlavaProcessor counts them: one per patch, plus the CLS token unless it is dropped
        height, width = pixel["pixel_values"].shape[-2:]
        patch = model_config.vision_config.patch_size
        n = (height // patch) * (width // patch) + getattr(processor, "num_additional_image_tokens", 1)
        return n - 1 if model_config.vision_feature_select_strategy == "default" else n

    def vision_features(self, model, pixel):
        return self.vision_features_batch(model, [pixel])[0]

    @torch.no_grad()
    def vision_features_batch(self, model, pixels):
        """One tower call for the pictures (same size after the processor), run only up to the
        deepest layer that `vision_feature_layer` reads: with the default -2, CLIP's last layer
        is never needed."""
        config = model.config
        tower = model.model.vision_tower
        values = torch.cat([p["pixel_values"] for p in pixels]).to(tower.device, tower.dtype)
        layers = config.vision_feature_layer
        layers = [layers] if isinstance(layers, int) else list(layers)
        encoder = getattr(getattr(tower, "vision_model", None), "encoder", None)
        full = getattr(encoder, "layers", None)
        if isinstance(full, torch.nn.ModuleList):
            layers = [i % (len(full) + 1) for i in layers]  # hidden_states[k]: after k layers
            encoder.layers = full[: max(layers)]
        try:
            out = tower(values, output_hidden_states=True)
        finally:
            if isinstance(full, torch.nn.ModuleList):
                encoder.layers = full
        hidden = [out.hidden_states[i] for i in layers]
        if config.vision_feature_select_strategy == "default":
            hidden = [h[:, 1:] for h in hidden]
        return [f.contiguous() for f in torch.cat(hidden, dim=-1).unbind(0)]

    def project(self, params, features):
        return projector_mlp(
            features, params["linear_1.weight"], params.get("linear_1.bias"),
            params["linear_2.weight"], params.get("linear_2.bias"),
        )

    def generate_inputs(self, model, input_ids, pixel):
        inputs = {"input_ids": input_ids[None], "attention_mask": torch.ones_like(input_ids)[None]}
        if pixel is not None:
            inputs["pixel_values"] = pixel["pixel_values"].to(model.device, model.dtype)
        return inputs
