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
adapter keeps the connector module itself.

`--scope vision:K`: the last K blocks, on the first one's cached input and rotary cos and sin. Qwen2.5-VL's
blocks work in window order (most attend within windows, `fullatt_block_indexes` over the whole picture),
and their output is put back in spatial order; a Qwen3-VL deepstack merger that reads an edited block takes
its output, the others' inputs are cached."""
from __future__ import annotations

import torch

from ..scope import run_layers
from .common import Connector, _Captured, call, rotary_split
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

    full_attention: frozenset = frozenset()  # the blocks that attend over the whole picture, not within windows

    def tower_stack(self, model):
        visual = model.model.visual  # Qwen3-VL's blocks have no windows
        self.full_attention = frozenset(getattr(visual, "fullatt_block_indexes", range(len(visual.blocks))))
        return super().tower_stack(model)

    @torch.no_grad()
    def vision_features(self, model, pixel):
        """The merger's input, its 2x2 groups in spatial order; with edited blocks, the first one's input and
        its rotary cos and sin in the tower's window order, side by side on the feature axis."""
        if self.edited:
            return super().vision_features(model, pixel)
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
        window_index, _ = windows(model, grid)
        return spatial_order(captured["x"], window_index, visual.spatial_merge_unit)

    def tower_outputs(self, model, params, features, grids):
        """The edited blocks on the batch's pictures (packed; a full-attention block attends within each
        picture, the others within each window of it), each picture's groups then put in spatial order."""
        width, unit = model.config.vision_config.hidden_size, model.config.vision_config.spatial_merge_size ** 2
        lengths = [len(f) for f in features]
        packed = torch.cat(features)
        hidden, cos, sin = rotary_split(packed, width)
        orders, window_bounds, start = [], [torch.zeros(1, dtype=torch.int32)], 0
        for f, grid in zip(features, grids):
            window_index, bounds = windows(model, grid["image_grid_thw"])
            orders.append(window_index)
            window_bounds.append(bounds[1:] + start)
            start += len(f)
        picture_bounds = torch.tensor([0, *lengths]).cumsum(0).to(torch.int32)
        window_bounds = torch.cat(window_bounds)
        for index, block in self.edited:
            bounds = picture_bounds if index in self.full_attention else window_bounds
            hidden = run_layers([(index, block)], params, hidden, cu_seqlens=bounds.to(packed.device),
                                max_seqlen=int((bounds[1:] - bounds[:-1]).max()), position_embeddings=(cos, sin))
        return [spatial_order(h, order, unit) for h, order in zip(hidden.split(lengths), orders)]

    def project(self, params, features, grid=None):
        return call(self._connector, params, "", features)

    def model_inputs(self, model, input_ids, attention_mask, grids, answer_starts):
        thw = [g["image_grid_thw"] for g in grids if g is not None]
        return {"mm_token_type_ids": (input_ids == model.config.image_token_id).int(),
                "image_grid_thw": torch.cat(thw).to(input_ids.device) if thw else None}


def windows(model, grid: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Qwen2.5-VL's window order of a picture's 2x2 groups and the bounds of its windows in that order."""
    from transformers.vision_utils import get_vision_window_index

    vision = model.config.vision_config
    return get_vision_window_index(grid.cpu(), vision.spatial_merge_size, vision.window_size, vision.patch_size)


def spatial_order(x: torch.Tensor, window_index: torch.Tensor, unit: int) -> torch.Tensor:
    """Rows in the tower's window order, their groups of `unit` put back in spatial order (as the model does
    after the merger: the merger works on each group alone)."""
    return x.reshape(-1, unit, x.shape[-1])[torch.argsort(window_index.to(x.device))].reshape(x.shape)


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
        """The merger's input and each deepstack merger's, side by side on the feature axis; with edited
        blocks: the first one's input, its rotary cos and sin, and the deepstack mergers' inputs below it."""
        visual = model.model.visual
        inputs, first = [], []
        handles = [m.register_forward_pre_hook(lambda module, args: inputs.append(args[0]))
                   for m in [*visual.deepstack_merger_list, visual.merger]]
        if self.edited:
            def hook(module, args, kwargs):
                first.extend([args[0] if args else kwargs["hidden_states"], *kwargs["position_embeddings"]])
                raise _Captured

            handles.append(self.edited[0][1].register_forward_pre_hook(hook, with_kwargs=True))
        try:
            visual(pixel["pixel_values"].to(visual.device, visual.dtype), grid_thw=pixel["image_grid_thw"].to(model.device))
        except _Captured:
            pass
        finally:
            for h in handles:
                h.remove()
        if self.edited:
            return torch.cat([*first, *inputs], dim=-1)
        return torch.cat([inputs[-1], *inputs[:-1]], dim=-1)  # [patches, C * (1 + deepstack levels)]

    def parts(self, model, params, features) -> list[torch.Tensor]:
        """One picture's [merger input, each deepstack merger's input]. With edited blocks: they run on the
        cached input of the first (over the whole picture), and the deepstack mergers that read one of them
        take its output."""
        if not self.edited:
            return [f.contiguous() for f in features.chunk(1 + len(self._connector.deepstack_merger_list), dim=-1)]
        vision = model.config.vision_config
        levels, width = vision.deepstack_visual_indexes, vision.hidden_size
        below = sum(level < self.edited[0][0] for level in levels)
        rotary = (features.shape[-1] - width * (1 + below)) // 2
        hidden, cos, sin, *deepstack = features.split([width, rotary, rotary] + [width] * below, dim=-1)
        bounds = torch.tensor([0, len(features)], dtype=torch.int32, device=features.device)
        for index, block in self.edited:
            hidden = run_layers([(index, block)], params, hidden, cu_seqlens=bounds, max_seqlen=len(features),
                                position_embeddings=(cos, sin))
            if index in levels:
                deepstack.append(hidden)
        return [hidden.contiguous(), *(d.contiguous() for d in deepstack)]

    def project_images(self, model, params, features, grids):
        return [call(self._connector.merger, params, "merger.", self.parts(model, params, f)[0]) for f in features]

    def connector_inputs(self, model, params, features, grids, inputs=None):
        import importlib

        output_class = importlib.import_module(type(model.model).__module__).BaseModelOutputWithDeepstackFeatures

        each = params if isinstance(params, list) else [params] * len(features)  # one dict per picture allowed
        parts = [self.parts(model, q, f) for q, f in zip(each, features)]
        merged = [call(self._connector.merger, q, "merger.", p[0]) for q, p in zip(each, parts)]
        deepstack = [[call(m, q, f"deepstack_merger_list.{i}.", p[i + 1]) for q, p in zip(each, parts)]
                     for i, m in enumerate(self._connector.deepstack_merger_list)]
        return {"mm_encoder_outputs": {"image": output_class(pooler_output=merged, deepstack_features=deepstack)}}
