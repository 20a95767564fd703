"""InternVL checkpoints in the transformers layout (model_type "internvl", the `-hf` repos): InternViT ->
pixel shuffle (parameter-free, in `get_image_features`) -> LayerNorm, Linear, GELU, Linear -> LLM.

Connector: `multi_modal_projector.layer_norm.{weight,bias}`, `.linear_{1,2}.{weight,bias}`. Features:
the pixel-shuffled tower output of every tile, as the connector receives it. Placeholders as
InternVLProcessor writes them: `<img>` + image_seq_length x tiles `<IMG_CONTEXT>` + `</img>`.
The original InternVL repos (`mlp1.*`, remote code) are not native to transformers: refused by
model_type. `--scope vision:K`: InternViT's last K layers on every tile (CLS token included), its final
LayerNorm as stored when the LLM reads the last layer, then `get_image_features`' CLS drop and pixel shuffle."""
from __future__ import annotations

from ..scope import TowerStack, layers_read, run_layers
from .common import ProcessorAdapter, after_tower


class InternVLAdapter(ProcessorAdapter):
    family = "internvl"
    model_types = ("internvl",)
    processor_class = "InternVLProcessor"
    processor_module = "internvl"
    needs_video_processor = True
    pooler_output_tensor = True
    batch_views = True

    def settings_from_config(self, config):
        """`<IMG_CONTEXT>` tokens per tile: the tile's patch grid, pixel-shuffled by downsample_ratio."""
        vision = config.vision_config
        (h, w), (ph, pw) = (_pair(vision.image_size), _pair(vision.patch_size))
        return {"image_seq_length": int(h // ph * config.downsample_ratio) * int(w // pw * config.downsample_ratio)}

    def tower_stack(self, model):
        tower, read = model.model.vision_tower, model.config.vision_feature_layer
        layers = tower.encoder.layer
        # -1 reads the last hidden state, after the tower's final LayerNorm; any other layer, its plain output
        return TowerStack("vision_tower.encoder.layer", layers, layers_read(read, len(layers)),
                          after=tower.layernorm if read == -1 else None)

    def project_one(self, model, module, params, features, grid):
        if self.edited:
            features = self.shuffled(model, params, features)
        return super().project_one(model, module, params, features, grid)

    def shuffled(self, model, params, features):
        """The edited layers on every tile's cached input [tiles x (1 + patches), width], then what
        `get_image_features` does to the layer read: LayerNorm (for -1), CLS drop, pixel shuffle."""
        config, vision = model.config, model.config.vision_config
        (h, w), (ph, pw) = (_pair(vision.image_size), _pair(vision.patch_size))
        tiles = features.view(-1, (h // ph) * (w // pw) + 1, features.shape[-1])
        hidden = after_tower(self, run_layers(self.edited, params, tiles))
        if config.vision_feature_select_strategy == "default":
            hidden = hidden[:, 1:]
        side = int(hidden.shape[1] ** 0.5)
        out = model.model.pixel_shuffle(hidden.reshape(len(hidden), side, side, -1), scale_factor=config.downsample_ratio)
        return out.reshape(-1, out.shape[-1])


def _pair(value):
    return tuple(value) if isinstance(value, (list, tuple)) else (value, value)
