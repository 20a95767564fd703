"""Idefics3 (model_type "idefics3") and SmolVLM ("smolvlm"): SigLIP-style tower on each sub-image (and the
global image) -> connector: pixel shuffle (scale_factor) then one Linear without bias -> LLM.

Connector: `model.connector.modality_projection.proj.weight` (stored under `model.` in both the Hub
layout and memory). Features: the tower's last hidden state of every real sub-image (padding
sub-images dropped, patch attention mask applied, as `get_image_features` does). Placeholders as
the processors write them: per sub-image `<fake_token_around_image><row_i_col_j>` + image_seq_len
`<image>`, then the global image with `<global-img>`. SmolVLMProcessor needs a video processor
(torchvision) and num2words for video prompts: its picture expansion, the module's own
`get_image_prompt_string`, is called directly."""
from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import torch

from .common import ProcessorAdapter, call, siglip_layers, siglip_stack


class Idefics3Adapter(ProcessorAdapter):
    family = "idefics3"
    model_types = ("idefics3",)
    processor_class = "Idefics3Processor"
    processor_module = "idefics3"
    projector_attr = "connector"
    projector_prefix = "connector."
    feature_keys = ("pixel_values", "pixel_attention_mask")

    def pixel_inputs(self, processor, image):
        return dict(processor.image_processor(images=[[image]], return_tensors="pt", return_row_col_info=True))

    def settings_from_config(self, config):
        """`<image>` tokens per sub-image: its patches, pixel-shuffled by scale_factor."""
        vision = config.vision_config
        return {"image_seq_len": (vision.image_size // vision.patch_size) ** 2 // config.scale_factor ** 2}

    def tower_stack(self, model):
        return siglip_stack(model)

    def project_one(self, model, module, params, features, grid):
        vision = model.config.vision_config
        sub_images = features.view(-1, (vision.image_size // vision.patch_size) ** 2, features.shape[-1])
        if self.edited:
            sub_images = siglip_layers(self, params, sub_images)
        out = call(module, params, "", sub_images)
        return out.reshape(-1, out.shape[-1])


class SmolVLMText(SimpleNamespace):
    """What fastunlearn needs of SmolVLMProcessor: tokenizer, image processor and picture expansion."""

    def replace_image_token(self, image_inputs, image_idx=0, **kwargs):
        from transformers.models.smolvlm.processing_smolvlm import get_image_prompt_string

        rows = [r for row_list in image_inputs["rows"] for r in row_list]
        cols = [c for col_list in image_inputs["cols"] for c in col_list]
        return get_image_prompt_string(rows[image_idx], cols[image_idx], self.image_seq_len,
                                       fake_token_around_image=self.fake_image_token, image_token=self.image_token,
                                       global_image_token=self.global_image_token)


class SmolVLMAdapter(Idefics3Adapter):
    family = "smolvlm"
    model_types = ("smolvlm",)
    processor_class = "SmolVLMProcessor"
    processor_module = "smolvlm"

    def load_processor(self, ckpt):
        settings = self.processor_files(Path(ckpt))
        return self.processor_from_parts(Path(ckpt), {**self.missing_settings(Path(ckpt), settings), **settings})

    def build_processor(self, tokenizer, image_processor, kwargs):
        if kwargs.get("chat_template"):
            tokenizer.chat_template = kwargs["chat_template"]
        return SmolVLMText(tokenizer=tokenizer, image_processor=image_processor, image_seq_len=kwargs.get("image_seq_len", 169),
                           fake_image_token=getattr(tokenizer, "fake_image_token", "<fake_token_around_image>"),
                           image_token=getattr(tokenizer, "image_token", "<image>"),
                           global_image_token=getattr(tokenizer, "global_image_token", "<global-img>"))


class Idefics2Adapter(Idefics3Adapter):
    """Idefics2 (model_type "idefics2"): the connector is a SwiGLU modality projection followed by a
    Perceiver resampler (latents, attention layers, norm): `model.connector.modality_projection.*` and
    `model.connector.perceiver_resampler.*`, all of it trainable. The resampler needs the patch
    attention mask of each sub-image, cached beside the features as one extra column."""

    family = "idefics2"
    model_types = ("idefics2",)
    processor_class = "Idefics2Processor"
    processor_module = "idefics2"

    def pixel_inputs(self, processor, image):
        return dict(processor.image_processor(images=[[image]], return_tensors="pt"))

    def settings_from_config(self, config):
        return {"image_seq_len": config.perceiver_config.resampler_n_latents}  # the resampler's latents

    def expand_prompt(self, processor, model_config, prompt, pixel):
        """As Idefics2Processor.__call__ writes it (the processor has no replace_image_token)."""
        import re

        fake, image = processor.fake_image_token, processor.image_token
        image_str = f"{fake}{image * processor.image_seq_len}{fake}"
        if processor.image_processor.do_image_splitting:
            image_str = image_str * 5
        prompt = prompt.replace(image, image_str).replace(f"{fake}{fake}", fake)
        return re.sub(rf"{re.escape(fake)}(?=[^\s<])", f"{fake} ", prompt)

    def features_of(self, x, kwargs):
        mask = kwargs["attention_mask"].reshape(-1, 1).to(x.dtype)
        return torch.cat([x.reshape(-1, x.shape[-1]), mask], dim=-1)

    def vision_features(self, model, pixel):
        x = super().vision_features(model, pixel)
        if self.edited:  # the first edited layer's input, every patch real (else refused): a column of ones
            x = torch.cat([x, x.new_ones(len(x), 1)], dim=-1)
        return x

    def project_one(self, model, module, params, features, grid):
        vision = model.config.vision_config
        sub_images = features.view(-1, (vision.image_size // vision.patch_size) ** 2, features.shape[-1])
        hidden = sub_images[..., :-1]
        if self.edited:
            hidden = siglip_layers(self, params, hidden)
        out = call(module, params, "", hidden, attention_mask=sub_images[..., -1].bool())
        return out.reshape(-1, out.shape[-1])
