"""LLaVA-1.5 style checkpoints (model_type "llava"): CLIP tower -> Linear, GELU, Linear -> Llama-style LLM.

Stored projector: multi_modal_projector.linear_1.{weight,bias}, multi_modal_projector.linear_2.{weight,bias}.
Vision features: hidden states of `vision_feature_layer` (an int, or a list concatenated on the
feature axis), CLS token dropped under the "default" select strategy.
"""
from __future__ import annotations

import torch
from transformers import AutoProcessor

from ..errors import UserError
from ..kernels.projector import projector_mlp
from ..scope import TowerStack, layers_read, run_layers
from .base import Adapter, clip_like_tower


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
        """One tower call for the pictures (one size after the processor), stopped after the deepest
        layer `vision_feature_layer` reads: with the default -2, CLIP's last layer never runs. With
        edited tower layers: the input of the first of them, CLS token included."""
        config = model.config
        tower = model.model.vision_tower
        values = torch.cat([p["pixel_values"] for p in pixels]).to(tower.device, tower.dtype)
        if self.edited:
            return [f.contiguous() for f in _hidden_states(tower, values, [self.edited[0][0]])[0].unbind(0)]
        layers = config.vision_feature_layer
        layers = [layers] if isinstance(layers, int) else list(layers)
        hidden = _hidden_states(tower, values, layers)
        if config.vision_feature_select_strategy == "default":
            hidden = [h[:, 1:] for h in hidden]
        return [f.contiguous() for f in torch.cat(hidden, dim=-1).unbind(0)]

    def tower_stack(self, model):
        return clip_stack(model)

    def tower_outputs(self, model, params, features):
        """The edited layers on each picture's cached input, then the select strategy: the projector's input."""
        if len({f.shape for f in features}) == 1:
            return list(clip_layers(model, self.edited, params, torch.stack(features)).unbind(0))
        return [clip_layers(model, self.edited, params, f[None])[0] for f in features]

    def project(self, params, features, grid=None):
        return projector_mlp(
            features, params["linear_1.weight"], params.get("linear_1.bias"),
            params["linear_2.weight"], params.get("linear_2.bias"),
        )

    def project_images(self, model, params, features, grids):
        if self.edited:
            features = self.tower_outputs(model, params, features)
        # token by token: one projector call for the whole batch
        return list(self.project(params, torch.cat(features)).split([len(f) for f in features]))

    def generate_inputs(self, model, input_ids, pixel):
        inputs = {"input_ids": input_ids[None], "attention_mask": torch.ones_like(input_ids)[None]}
        if pixel is not None:
            inputs["pixel_values"] = pixel["pixel_values"].to(model.device, model.dtype)
        return inputs


def clip_stack(model) -> TowerStack:
    """The encoder layers of a CLIP- or SigLIP-style tower (`vision_tower[.vision_model].encoder.layers`)
    that the LLM reads at one layer, `vision_feature_layer`."""
    path, vision = clip_like_tower(model)
    layers = getattr(getattr(vision, "encoder", None), "layers", None)
    config = model.config
    read = getattr(config, "vision_feature_layer", getattr(config, "vision_feature_layers", None))  # VipLLaVA: a list
    if not isinstance(layers, torch.nn.ModuleList):
        raise UserError("--scope vision:K: needs a CLIP-style tower (encoder.layers), and this checkpoint's has "
                        "none; use --scope connector")
    return TowerStack(path, layers, layers_read(read, len(layers)))


def clip_layers(model, edited, params, hidden: torch.Tensor) -> torch.Tensor:
    """The edited layers on their cached input [pictures or tiles, tokens, width], then the select
    strategy ("default" drops the CLS token): the projector's input."""
    hidden = run_layers(edited, params, hidden, attention_mask=None)
    return hidden[:, 1:] if model.config.vision_feature_select_strategy == "default" else hidden


class _Done(Exception):
    pass


def _hidden_states(tower, values: torch.Tensor, indices: list[int]) -> list[torch.Tensor]:
    """`tower(values, output_hidden_states=True).hidden_states[i]` for each i in `indices`, the encoder
    stopped after the deepest layer read (hidden_states[k]: the encoder's input for k = 0, else the
    output of its layer k - 1). Falls back to the whole tower when it has no `encoder.layers`."""
    encoder = getattr(getattr(tower, "vision_model", tower), "encoder", None)  # CLIP: tower.encoder
    blocks = getattr(encoder, "layers", None)
    if not isinstance(blocks, torch.nn.ModuleList):
        out = tower(values, output_hidden_states=True)
        return [out.hidden_states[i] for i in indices]
    positive = [i % (len(blocks) + 1) for i in indices]
    seen = {}

    def keep(k, last):
        def hook(module, args, kwargs, output=None):
            x = (args[0] if args else kwargs.get("inputs_embeds", kwargs.get("hidden_states"))) if output is None else output
            seen[k] = x[0] if isinstance(x, tuple) else x
            if last:
                raise _Done
        return hook

    deepest = max(positive)
    handles = [encoder.register_forward_pre_hook(keep(0, deepest == 0), with_kwargs=True)]
    handles += [blocks[k - 1].register_forward_hook(keep(k, k == deepest), with_kwargs=True)
                for k in sorted(set(positive)) if k > 0]
    try:
        tower(values)
    except _Done:
        pass
    finally:
        for h in handles:
            h.remove()
    return [seen[i] for i in positive]
