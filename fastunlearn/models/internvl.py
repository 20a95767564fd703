"""InternVL checkpoints in the transformers layout (model_type "internvl", the `-hf` repos): InternViT ->
pixel shuffle (parameter-free, in `get_image_features`) -> LayerNorm, Linear, GELU, Linear -> LLM.

Connector: `multi_modal_projector.layer_norm.{weight,bias}`, `.linear_{1,2}.{weight,bias}`. Features:
the pixel-shuffled tower output of every tile, as the connector receives it. Placeholders as
InternVLProcessor writes them: `<img>` + image_seq_length x tiles `<IMG_CONTEXT>` + `</img>`.
The original InternVL repos (`mlp1.*`, remote code) are not native to transformers: refused by
model_type."""
from __future__ import annotations

from .common import ProcessorAdapter


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


def _pair(value):
    return tuple(value) if isinstance(value, (list, tuple)) else (value, value)
