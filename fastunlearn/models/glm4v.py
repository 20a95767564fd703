"""GLM-4V / GLM-4.1V checkpoints (model_type "glm4v"): ViT -> post LayerNorm -> 2x2 downsample conv (frozen,
part of the vision model) -> connector: Linear, LayerNorm, GELU, SwiGLU down -> GLM-4 LLM with M-RoPE.

Connector: `model.visual.merger.{proj,post_projection_norm,gate_proj,up_proj,down_proj}.*`. Features:
the downsampled tower output, one row per image token. Placeholders as Glm4vProcessor writes them:
`grid_t*grid_h*grid_w / merge^2` `<|image|>`; positions computed by the model from
`image_grid_thw` and `mm_token_type_ids`. Glm4vProcessor wants a video processor (torchvision): it is
built without one. The merger lives inside the vision model, which is freed once the features are
cached: the adapter keeps the merger module itself. `--scope vision:K`: the last K blocks on the first one's
cached input and rotary cos and sin (attending over the whole picture), then the post LayerNorm and the
downsample conv as stored."""
from __future__ import annotations

import torch

from ..scope import TowerStack, run_layers
from .common import ProcessorAdapter, after_tower, frozen, rotary_split


class Glm4vAdapter(ProcessorAdapter):
    family = "glm4v"
    model_types = ("glm4v", "glm4v_moe")  # the MoE variant differs only in the LLM
    processor_class = "Glm4vProcessor"
    processor_module = "glm4v"
    needs_video_processor = True
    projector_prefix = "visual.merger."
    feature_keys = ("pixel_values", "image_grid_thw")
    _merger = None

    def projector_module(self, model):
        if model.model.visual is not None:
            self._merger = model.model.visual.merger
        return self._merger

    def hooked_module(self, model):
        return model.model.visual.merger

    downsample = None  # the tower's frozen 2x2 conv, kept for the edited blocks' output

    def tower_stack(self, model):
        visual = model.model.visual
        self.downsample = visual.downsample
        return TowerStack("visual.blocks", visual.blocks, len(visual.blocks), after=visual.post_layernorm)

    def project_one(self, model, module, params, features, grid):
        if self.edited:
            vision = model.config.vision_config
            hidden, cos, sin = rotary_split(features, vision.hidden_size)
            bounds = torch.tensor([0, len(hidden)], dtype=torch.int32, device=hidden.device)
            hidden = after_tower(self, run_layers(self.edited, params, hidden, cu_seqlens=bounds, max_seqlen=len(hidden),
                                                  position_embeddings=(cos, sin)))
            merge = vision.spatial_merge_size
            groups = hidden.view(-1, merge, merge, hidden.shape[-1]).permute(0, 3, 1, 2)
            features = frozen(self.downsample, groups).view(-1, vision.out_hidden_size)
        return super().project_one(model, module, params, features, grid)

    def model_inputs(self, model, input_ids, attention_mask, grids, answer_starts):
        thw = [g["image_grid_thw"] for g in grids if g is not None]
        return {"mm_token_type_ids": (input_ids == model.config.image_token_id).int(),
                "image_grid_thw": torch.cat(thw).to(input_ids.device) if thw else None}

    def generate_inputs(self, model, input_ids, pixel):
        inputs = super().generate_inputs(model, input_ids, pixel)
        inputs["mm_token_type_ids"] = (inputs["input_ids"] == model.config.image_token_id).int()
        return inputs
