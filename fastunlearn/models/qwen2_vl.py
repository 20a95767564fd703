"""Qwen2-VL checkpoints (model_type "qwen2_vl"): ViT -> PatchMerger (LayerNorm, 2x2 merge, Linear,
GELU, Linear) -> Qwen2 LLM with multimodal RoPE.

Stored projector: visual.merger.ln_q.{weight,bias}, visual.merger.mlp.0.*, visual.merger.mlp.2.*.
Vision features: the vision blocks' output before the merger, [patches, embed_dim]; the image
processor orders patches so that each 2x2 merge group is contiguous.

The processor is not used as a whole: Qwen2VLProcessor also builds a video processor, which needs
torchvision. The checkpoint's real tokenizer and image processor are loaded instead and the
placeholder expansion (grid_t * grid_h * grid_w / merge^2 tokens) is done here, as the processor does.
"""
from __future__ import annotations

from types import SimpleNamespace

import torch
import torch.nn.functional as F
from transformers import AutoImageProcessor, AutoTokenizer

from ..kernels.projector import projector_mlp
from ..scope import TowerStack, run_layers
from .base import Adapter
from .common import _Captured, rotary_split


class Qwen2VLAdapter(Adapter):
    family = "qwen2_vl"
    model_types = ("qwen2_vl",)
    projector_prefix = "visual.merger."
    answer_separator = ""

    def load_processor(self, ckpt):
        return SimpleNamespace(
            tokenizer=AutoTokenizer.from_pretrained(ckpt), image_processor=AutoImageProcessor.from_pretrained(ckpt)
        )

    def projector_module(self, model):
        return model.model.visual.merger

    def default_prompt(self, question, with_image):
        image = "<|vision_start|><|image_pad|><|vision_end|>" if with_image else ""
        return f"<|im_start|>user\n{image}{question}<|im_end|>\n<|im_start|>assistant\n"

    def n_image_tokens(self, processor, model_config, pixel):
        return int(pixel["image_grid_thw"].prod()) // model_config.vision_config.spatial_merge_size**2

    @torch.no_grad()
    def vision_features(self, model, pixel):
        """The blocks' output; with edited blocks, the first one's input and its rotary cos and sin,
        side by side on the feature axis (a block attends within its picture only, so a picture's
        rows are all it needs)."""
        visual = model.model.visual
        values, grid = pixel["pixel_values"].to(visual.device, visual.dtype), pixel["image_grid_thw"].to(visual.device)
        if not self.edited:
            return visual(values, grid_thw=grid).last_hidden_state
        captured = {}

        def hook(module, args, kwargs):
            captured["hidden"] = args[0] if args else kwargs["hidden_states"]
            captured["cos_sin"] = kwargs["position_embeddings"]
            raise _Captured

        handle = self.edited[0][1].register_forward_pre_hook(hook, with_kwargs=True)
        try:
            visual(values, grid_thw=grid)
        except _Captured:
            pass
        finally:
            handle.remove()
        return torch.cat([captured["hidden"], *captured["cos_sin"]], dim=-1)

    def tower_stack(self, model):
        blocks = model.model.visual.blocks
        return TowerStack("visual.blocks", blocks, len(blocks))

    def tower_outputs(self, model, params, features, grids):
        """The edited blocks on the batch's pictures (packed, each attending within itself; the grids are not
        needed)."""
        width = model.config.vision_config.embed_dim
        lengths = [len(f) for f in features]
        packed = torch.cat(features)
        hidden, cos, sin = rotary_split(packed, width)
        bounds = torch.tensor([0, *lengths], device=packed.device).cumsum(0).to(torch.int32)
        out = run_layers(self.edited, params, hidden, cu_seqlens=bounds, max_seqlen=max(lengths),
                         position_embeddings=(cos, sin))
        return list(out.split(lengths))

    def project_images(self, model, params, features, grids):
        if self.edited:
            features = self.tower_outputs(model, params, features, grids)
        # merge group by merge group: one merger call for the whole batch
        merge = model.config.vision_config.spatial_merge_size ** 2
        return list(self.project(params, torch.cat(features)).split([len(f) // merge for f in features]))

    def project(self, params, features, grid=None):
        dim = features.shape[-1]
        x = F.layer_norm(features, (dim,), params["ln_q.weight"], params["ln_q.bias"], eps=1e-6)
        x = x.reshape(-1, params["mlp.0.weight"].shape[1])
        return projector_mlp(x, params["mlp.0.weight"], params["mlp.0.bias"], params["mlp.2.weight"], params["mlp.2.bias"])

    def position_ids(self, model, input_ids, attention_mask, pixels):
        grids = [p["image_grid_thw"] for p in pixels if p is not None]
        if not grids:
            return None
        token_types = (input_ids == model.config.image_token_id).int()
        positions, _ = model.model.get_rope_index(
            input_ids, mm_token_type_ids=token_types, image_grid_thw=torch.cat(grids).to(input_ids.device),
            attention_mask=attention_mask,
        )
        return positions

    def generate_inputs(self, model, input_ids, pixel):
        inputs = {"input_ids": input_ids[None], "attention_mask": torch.ones_like(input_ids)[None]}
        if pixel is not None:
            inputs["pixel_values"] = pixel["pixel_values"].to(model.device, model.dtype)
            inputs["image_grid_thw"] = pixel["image_grid_thw"].to(model.device)
            inputs["mm_token_type_ids"] = (inputs["input_ids"] == model.config.image_token_id).int()
        return inputs
