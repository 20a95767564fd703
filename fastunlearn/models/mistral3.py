"""Mistral 3 / Pixtral-style checkpoints (model_type "mistral3"): Pixtral tower -> RMSNorm -> 2x2 patch
merger (per picture, on its patch grid) -> Linear, GELU, Linear -> Mistral LLM.

Connector: `multi_modal_projector.norm.weight`, `.patch_merger.merging_layer.weight`,
`.linear_{1,2}.weight` (+ biases when `multimodal_projector_bias`). Features: the tower's selected
hidden states, [patches, features], run through the family's own projector module with the
picture's `image_sizes`. Placeholders as PixtralProcessor writes them: per row of merged patches,
`[IMG]` per patch then `[IMG_BREAK]`, the last one `[IMG_END]`; only `[IMG]` receives tokens.
PixtralProcessor needs torchvision, so its expansion (below, the same rule) is done here from the
checkpoint's processor_config.json. `--scope vision:K`: the last K Pixtral layers the LLM reads, on the
first one's cached input and rotary cos and sin (one picture attends to itself only)."""
from __future__ import annotations

from types import SimpleNamespace

from ..scope import TowerStack, layers_read, run_layers
from .common import ProcessorAdapter, call, rotary_split


class PixtralText(SimpleNamespace):
    """What fastunlearn needs of PixtralProcessor: the tokenizer, image processor, chat template and
    its placeholder expansion."""

    def replace_image_token(self, image_inputs, image_idx=0, **kwargs):
        patch = self.patch_size * self.spatial_merge_size
        height, width = (int(v) for v in image_inputs["image_sizes"][image_idx])
        rows = [[self.image_token] * (width // patch) + [self.image_break_token]] * (height // patch)
        tokens = [t for row in rows for t in row]
        tokens[-1] = self.image_end_token
        return "".join(tokens)


class Mistral3Adapter(ProcessorAdapter):
    family = "mistral3"
    model_types = ("mistral3",)
    processor_class = "PixtralProcessor"
    feature_keys = ("pixel_values", "image_sizes")

    def build_processor(self, tokenizer, image_processor, kwargs):
        if kwargs.get("chat_template"):
            tokenizer.chat_template = kwargs["chat_template"]  # the prompt is templated by the tokenizer
        return PixtralText(tokenizer=tokenizer, image_processor=image_processor, patch_size=kwargs.get("patch_size", 16),
                           spatial_merge_size=kwargs.get("spatial_merge_size", 1),
                           image_token=kwargs.get("image_token", "[IMG]"),
                           image_break_token=kwargs.get("image_break_token", "[IMG_BREAK]"),
                           image_end_token=kwargs.get("image_end_token", "[IMG_END]"))

    def settings_from_config(self, config):
        """[IMG] tokens per picture follow from the tower's patch size and the merger's spatial_merge_size."""
        return {"patch_size": config.vision_config.patch_size, "spatial_merge_size": config.spatial_merge_size}

    def tower_stack(self, model):
        layers = model.model.vision_tower.transformer.layers
        return TowerStack("vision_tower.transformer.layers", layers, layers_read(model.config.vision_feature_layer, len(layers)))

    def project_one(self, model, module, params, features, grid):
        if self.edited:
            hidden, cos, sin = rotary_split(features, model.config.vision_config.hidden_size)
            features = run_layers(self.edited, params, hidden[None], attention_mask=None, position_embeddings=(cos, sin))[0]
        return call(module, params, "", features, grid["image_sizes"])
