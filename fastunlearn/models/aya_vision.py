"""Aya Vision checkpoints (model_type "aya_vision"): SigLIP -> connector: pixel shuffle (downsample_factor,
parameter-free, inside the module) -> LayerNorm -> Linear -> SwiGLU -> Linear -> LLM.

Connector: `multi_modal_projector.layernorm.{weight,bias}`, `.linear_1.*`, `.linear_2.*`. Features:
the tower's selected hidden states of each tile (GotOcr2 crop-to-patches tiles plus the global
image). Placeholders as AyaVisionProcessor writes them: `<|START_OF_IMG|>`, per tile `TILE_i` then
`<|IMG_PATCH|>` x tokens, the global tile after `TILE_GLOBAL`, `<|END_OF_IMG|>`; only
`<|IMG_PATCH|>` (config.image_token_id) receives projected tokens. `--scope vision:K`: SigLIP's layers
as LLaVA's, on every tile."""
from __future__ import annotations

from .common import ProcessorAdapter, call
from .llava import clip_layers, clip_stack


class AyaVisionAdapter(ProcessorAdapter):
    family = "aya_vision"
    model_types = ("aya_vision",)
    processor_class = "AyaVisionProcessor"
    processor_module = "aya_vision"
    pooler_output_tensor = True
    batch_views = True

    def logit_scale(self, model) -> float:
        # Cohere's LLMs are trained with scaled logits; AyaVisionForConditionalGeneration applies the
        # scale from transformers 5.25 on (5.24 dropped it), and the job's NLLs use it on every version
        return float(getattr(model.config.get_text_config(), "logit_scale", 1.0))

    def tower_stack(self, model):
        return clip_stack(model)

    def project_one(self, model, module, params, features, grid):
        n_tiles = int(grid["num_patches"][0])
        tiles = features.view(n_tiles, -1, features.shape[-1])
        if self.edited:
            tiles = clip_layers(model, self.edited, params, tiles)
        out = call(module, params, "", tiles)
        return out.reshape(-1, out.shape[-1])
