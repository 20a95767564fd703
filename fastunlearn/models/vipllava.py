"""VipLLaVA checkpoints (model_type "vipllava"): CLIP hidden states of several layers (CLS dropped),
concatenated -> LayerNorm, Linear, GELU, Linear -> LLM; LlavaProcessor placeholders.

Connector: `multi_modal_projector.projector_layernorm.*`, `.linear_{1,2}.{weight,bias}`."""
from __future__ import annotations

from .common import ProcessorAdapter
from .llava import clip_stack


class VipLlavaAdapter(ProcessorAdapter):
    family = "vipllava"
    model_types = ("vipllava",)
    processor_class = "LlavaProcessor"
    processor_module = "llava"
    pooler_output_tensor = True
    batch_views = True

    def tower_stack(self, model):
        return clip_stack(model)  # refuses: the connector reads several layers
