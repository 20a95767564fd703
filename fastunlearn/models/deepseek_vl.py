"""DeepSeek-VL checkpoints in the transformers layout (model_type "deepseek_vl"): SigLIP -> aligner
(Linear, GELU, Linear) -> Llama LLM.

Connector: `model.aligner.linear{1,2}.{weight,bias}` (`aligner.*` in the older layout). Features: the
tower's last hidden state. Placeholders as DeepseekVLProcessor writes them: num_image_tokens
copies of the image token. DeepSeek-VL2 and the original repos are remote code: refused by
model_type; DeepSeek-VL hybrid ("deepseek_vl_hybrid", with a second high-resolution tower) is not
covered. `--scope vision:K`: the last K of SigLIP's layers, then its post-LayerNorm as stored."""
from __future__ import annotations

from .common import SiglipAdapter


class DeepseekVLAdapter(SiglipAdapter):
    family = "deepseek_vl"
    model_types = ("deepseek_vl",)
    processor_class = "DeepseekVLProcessor"
    processor_module = "deepseek_vl"
    projector_attr = "aligner"
    projector_prefix = "aligner."
    pooler_output_tensor = True
    batch_views = True
