"""One adapter per architecture family.

An adapter knows, for its family: where the projector lives (in memory and as stored tensors),
how to turn (image, question, answer) into token ids with the answer's position, how to get the
vision features that enter the projector, how to run the projector as a pure function of its
parameters, and the extra inputs (position ids) the language model needs. Everything else (the
frozen LLM, embeddings, lm_head) is shared. Adding a family = one new module with one class.
"""
from __future__ import annotations

from ..errors import UserError
from .base import Adapter, Encoded, without_vision_model  # noqa: F401 - the package's interface


def all_adapters() -> list[Adapter]:
    from .llava import LlavaAdapter
    from .llava_next import LlavaNextAdapter, LlavaNextVideoAdapter, LlavaOnevisionAdapter
    from .aya_vision import AyaVisionAdapter
    from .deepseek_vl import DeepseekVLAdapter
    from .gemma3 import Gemma3Adapter
    from .glm4v import Glm4vAdapter
    from .idefics3 import Idefics2Adapter, Idefics3Adapter, SmolVLMAdapter
    from .internvl import InternVLAdapter
    from .mistral3 import Mistral3Adapter
    from .mllama import MllamaAdapter
    from .paligemma import PaliGemmaAdapter
    from .qwen2_vl import Qwen2VLAdapter
    from .vipllava import VipLlavaAdapter
    from .qwen_vl import Qwen3VLAdapter, Qwen25VLAdapter

    return [LlavaAdapter(), Qwen2VLAdapter(), LlavaNextAdapter(), LlavaOnevisionAdapter(), Mistral3Adapter(),
            InternVLAdapter(), PaliGemmaAdapter(), Gemma3Adapter(), Idefics3Adapter(), SmolVLMAdapter(), Qwen25VLAdapter(),
            Qwen3VLAdapter(), MllamaAdapter(), Idefics2Adapter(), AyaVisionAdapter(),
            DeepseekVLAdapter(), Glm4vAdapter(), LlavaNextVideoAdapter(), VipLlavaAdapter()]


# families of transformers' image-text-to-text models that are known and refused, with the reason
_TORCHVISION_ONLY = ("transformers 5.24 has only a torchvision image processor for it ({}), so fastunlearn cannot "
                     "prepare its pictures without torchvision and has no tested adapter for it")
UNSUPPORTED = {
    "llama4": _TORCHVISION_ONLY.format("Llama4ImageProcessor"),
    "lfm2_vl": _TORCHVISION_ONLY.format("Lfm2VlImageProcessor"),
    "cohere2_vision": _TORCHVISION_ONLY.format("Cohere2VisionImageProcessor"),
    "perception_lm": _TORCHVISION_ONLY.format("PerceptionLMImageProcessor"),
}


def adapter_for(model_type: str | None) -> Adapter:
    for adapter in all_adapters():
        if model_type in adapter.model_types:
            return adapter
    if model_type in UNSUPPORTED:
        raise UserError(f"model_type {model_type!r} is not supported: {UNSUPPORTED[model_type]}")
    supported = ", ".join(t for a in all_adapters() for t in a.model_types)
    raise UserError(f"model_type {model_type!r} has no fastunlearn adapter (supported: {supported})")


def stored_projector_names(adapter: Adapter, module_names: list[str], stored: list[str]) -> dict[str, str]:
    """Map the projector's module-relative parameter names to stored tensor names."""
    return stored_names({name: adapter.projector_prefix + name for name in module_names}, stored)


def stored_names(stems: dict[str, str], stored: list[str]) -> dict[str, str]:
    """Map each key to the one stored tensor named by its stem.

    transformers renames keys in memory (`model.multi_modal_projector.*` vs stored
    `multi_modal_projector.*`), so names are resolved from the file headers: a stored name matches
    when it is the stem or ends with `.` + the stem.
    """
    mapping = {}
    for key, full in stems.items():
        hits = [s for s in stored if s == full or s.endswith("." + full)]
        if not hits:  # transformers 5 drops CLIP's and SigLIP's `vision_model.` level; Hub files still have it
            hits = [s for s in stored if without_vision_model(s) == full or without_vision_model(s).endswith("." + full)]
        if len(hits) != 1:
            what = "no stored tensor" if not hits else f"several stored tensors ({', '.join(hits)})"
            raise UserError(f"parameter {full!r}: {what} in the checkpoint; is config.json right?")
        mapping[key] = hits[0]
    return mapping
