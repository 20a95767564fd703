"""Qwen2.5-VL (model_type "qwen2_5_vl") and Qwen3-VL ("qwen3_vl"): the Qwen2-VL recipe (tokenizer and
image processor from the checkpoint, `grid_t*grid_h*grid_w / merge^2` `<|image_pad|>` tokens,
M-RoPE positions computed by the model itself from `image_grid_thw` and `mm_token_type_ids`).

Qwen2.5-VL connector: `visual.merger.ln_q.weight` (RMSNorm), `visual.merger.mlp.{0,2}.{weight,bias}`.
The tower's output is in window order; the merger works on each 2x2 group alone, so the cached
groups are put back in spatial order (`argsort(window_index)`, as the model does after the merger)
and the merger's output needs no reorder.

Qwen3-VL connector: `model.visual.merger.{norm,linear_fc1,linear_fc2}.*` and every
`model.visual.deepstack_merger_list.<i>.*` (same names on disk and in memory): the deepstack mergers
turn the block outputs at `deepstack_visual_indexes` into features that the LLM adds to the visual
positions of its first layers. Cached features: the last block's output and those block outputs,
side by side on the feature axis; the forward gets `deepstack_features` in `mm_encoder_outputs`.

Both connectors live inside the vision model, which is freed once the features are cached: the
adapter keeps the connector module itself."""
from __future__ import annotations

import torch

from ..errors import UserError
from .common import Connector, _Captured, call
from .qwen2_vl import Qwen2VLAdapter


class Qwen25VLAdapter(Qwen2VLAdapter):
    family = "qwen2_5_vl"
    model_types = ("qwen2_5_vl",)
    _connector = None

    def projector_module(self, model):
        visual = model.model.visual
        if visual is not None:
            self._connector = self.connector_of(visual)
        if self._connector is None:
            raise RuntimeError("the connector was never seen: open the checkpoint before dropping the vision model")
        return self._connector

    def connector_of(self, visual):
        return visual.merger

    def tower_stack(self, model):
        raise UserError(f"--scope vision:K: not available for {self.family} checkpoints yet (their blocks attend within "
                        "windows of a reordered patch sequence); use --scope connector")

    @torch.no_grad()
    def vision_features(self, model, pixel):
        from transformers.vision_utils import get_vision_window_index

        visual, grid = model.model.visual, pixel["image_grid_thw"].to(model.device)
        captured = {}

        def hook(module, args):
            captured["x"] = args[0]
            raise _Captured

        handle = visual.merger.register_forward_pre_hook(hook)
        try:
            visual(pixel["pixel_values"].to(visual.device, visual.dtype), grid_thw=grid)
        except _Captured:
            pass
        finally:
            handle.remove()
        window_index, _ = get_vision_window_index(grid, visual.spatial_merge_size, visual.window_size, visual.patch_size)
        x = captured["x"]
        unit = visual.spatial_merge_unit
        return x.reshape(-1, unit, x.shape[-1])[torch.argsort(window_index.to(x.device))].reshape(x.shape)

    def project(self, params, features, grid=None):
        return call(self._connector, params, "", features)

    def model_inputs(self, model, input_ids, attention_mask, grids, answer_starts):
        thw = [g["image_grid_thw"] for g in grids if g is not None]
        return {"mm_token_type_ids": (input_ids == model.config.image_token_id).int(),
                "image_grid_thw": torch.cat(thw).to(input_ids.device) if thw else None}


class Qwen3VLAdapter(Qwen25VLAdapter):
    family = "qwen3_vl"
    model_types = ("qwen3_vl", "qwen3_vl_moe")  # the MoE variant differs only in the LLM
    projector_prefix = "visual."

    def connector_paths(self):
        return ("visual.merger.", "visual.deepstack_merger_list.")

    def connector_of(self, visual):
        return Connector(merger=visual.merger, deepstack_merger_list=visual.deepstack_merger_list)

    @torch.no_grad()
    def vision_features(self, model, pixel):
        visual = model.model.visual
        inputs = []
        handles = [m.register_forward_pre_hook(lambda module, args: inputs.append(args[0]))
                   for m in [*visual.deepstack_merger_list, visual.merger]]
        try:
            visual(pixel["pixel_values"].to(visual.device, visual.dtype), grid_thw=pixel["image_grid_thw"].to(model.device))
        finally:
            for h in handles:
                h.remove()
        return torch.cat([inputs[-1], *inputs[:-1]], dim=-1)  # [patches, C * (1 + deepstack levels)]

    def split(self, features):
        return [f.contiguous() for f in features.chunk(1 + len(self._connector.deepstack_merger_list), dim=-1)]

    def project(self, params, features, grid=None):
        return call(self._connector.merger, params, "merger.", self.split(features)[0])

    def project_images(self, model, params, features, grids):
        return [self.project(params, f) for f in features]

    def connector_inputs(self, model, params, features, grids, inputs=None):
        import importlib

        output_class = importlib.import_module(type(model.model).__module__).BaseModelOutputWithDeepstackFeatures

        parts = [self.split(f) for f in features]
        each = params if isinstance(params, list) else [params] * len(parts)  # one dict per picture allowed
        merged = [call(self._connector.merger, q, "merger.", p[0]) for q, p in zip(each, parts)]
        deepstack = [[call(m, q, f"deepstack_merger_list.{i}.", p[i + 1]) for q, p in zip(each, parts)]
                     for i, m in enumerate(self._connector.deepstack_merger_list)]
        return {"mm_encoder_outputs": {"image": output_class(pooler_output=merged, deepstack_features=deepstack)}}
