"""Gemma 3 checkpoints (model_type "gemma3"): SigLIP -> average pool to mm_tokens_per_image -> RMSNorm
x(1+w) -> x @ W -> Gemma 3 LLM.

Connector: `multi_modal_projector.mm_input_projection_weight` (stored [vision, text]: a plain
parameter, not an nn.Linear) and `multi_modal_projector.mm_soft_emb_norm.weight`. Features: SigLIP's
last hidden state per crop. The chat template writes `<start_of_image>`, which Gemma3Processor
expands to `<start_of_image>` + soft tokens + `<end_of_image>`; `token_type_ids` (1 on the soft
tokens) give the bidirectional attention inside each picture, as the processor's output does.
`--scope vision:K`: the last K of SigLIP's layers on every crop, then its post-LayerNorm as stored."""
from __future__ import annotations

from .common import ProcessorAdapter, call, siglip_layers, siglip_stack


class Gemma3Adapter(ProcessorAdapter):
    family = "gemma3"
    model_types = ("gemma3",)
    processor_class = "Gemma3Processor"
    processor_module = "gemma3"
    pooler_output_tensor = True
    batch_views = True

    def pixel_inputs(self, processor, image):
        """The image processor's settings; those it leaves null (Hub files leave pan-and-scan's crop size,
        crop count and ratio null) get Gemma3Processor's defaults, as a processor call would give them."""
        image_processor = processor.image_processor
        defaults = {k: v for k, v in getattr(type(processor), "images_kwargs", {}).items()
                    if getattr(image_processor, k, None) is None}
        return dict(image_processor(images=[image], return_tensors="pt", **defaults))

    def tower_stack(self, model):
        return siglip_stack(model)

    def project_one(self, model, module, params, features, grid):
        vision = model.config.vision_config
        crops = features.view(-1, (vision.image_size // vision.patch_size) ** 2, features.shape[-1])
        if self.edited:
            crops = siglip_layers(self, params, crops)
        out = call(module, params, "", crops)
        return out.reshape(-1, out.shape[-1])

    def model_inputs(self, model, input_ids, attention_mask, grids, answer_starts):
        return {"token_type_ids": (input_ids == model.config.image_token_id).long()}

    def generate_inputs(self, model, input_ids, pixel):
        inputs = super().generate_inputs(model, input_ids, pixel)
        inputs["token_type_ids"] = (inputs["input_ids"] == model.config.image_token_id).long()
        return inputs
