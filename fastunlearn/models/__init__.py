"""One adapter per architecture family.

An adapter knows, for its family: where the projector lives (in memory and as stored tensors),
how to turn (image, question, answer) into token ids with the answer's position, how to get the
vision features that enter the projector, how to run the projector as a pure function of its
parameters, and the extra inputs (position ids) the language model needs. Everything else (the
frozen LLM, embeddings, lm_head) is shared. Adding a family = one new module with one class.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from ..errors import UserError


@dataclass
class Encoded:
    input_ids: torch.Tensor  # [L] int64, image placeholders already expanded
    answer_start: int  # index in input_ids of the first answer token (== len(input_ids) without answer)


class Adapter:
    family: str = ""
    model_types: tuple[str, ...] = ()
    projector_prefix: str = ""  # stored-name prefix of the projector tensors, e.g. "multi_modal_projector."
    answer_separator: str = ""  # text between the generation prompt and the answer

    # -- loading
    def load_processor(self, ckpt: Path):
        raise NotImplementedError

    def projector_module(self, model) -> torch.nn.Module:
        raise NotImplementedError

    def check_config(self, config) -> None:
        """Raise UserError for configurations this adapter cannot handle."""

    # -- text and pixels
    def prompt(self, processor, question: str, with_image: bool) -> str:
        """The generation prompt, from the checkpoint's chat template when it has one."""
        content = ([{"type": "image"}] if with_image else []) + [{"type": "text", "text": question}]
        templater = processor if getattr(processor, "chat_template", None) else processor.tokenizer
        if getattr(templater, "chat_template", None):
            return templater.apply_chat_template(
                [{"role": "user", "content": content}], add_generation_prompt=True, tokenize=False
            )
        return self.default_prompt(question, with_image)

    def default_prompt(self, question: str, with_image: bool) -> str:
        raise NotImplementedError

    def pixel_inputs(self, processor, image) -> dict[str, torch.Tensor]:
        return dict(processor.image_processor(images=[image], return_tensors="pt"))

    def n_image_tokens(self, processor, model_config, pixel: dict) -> int:
        """How many placeholder tokens the image takes in the LLM sequence."""
        raise NotImplementedError

    def encode(self, processor, model_config, pixel: dict | None, question: str, answer: str | None) -> Encoded:
        """Token ids of prompt (+ answer), image placeholders expanded, answer token-aligned."""
        tokenizer = processor.tokenizer
        prompt = self.prompt(processor, question, pixel is not None)
        if pixel is not None:
            placeholder = tokenizer.convert_ids_to_tokens(model_config.image_token_id)
            if prompt.count(placeholder) != 1:
                raise UserError(f"the prompt template must hold the image placeholder {placeholder!r} once")
            prompt = prompt.replace(placeholder, placeholder * self.n_image_tokens(processor, model_config, pixel))

        def ids(text):
            return torch.tensor(tokenizer(text)["input_ids"], dtype=torch.long)

        prompt_ids = ids(prompt)
        n = len(prompt_ids)
        if answer is None:
            return Encoded(prompt_ids, n)
        full_ids = ids(prompt + self.answer_separator + answer)
        if len(full_ids) <= n or not torch.equal(full_ids[:n], prompt_ids):
            # the answer merged with the prompt's last token: tokenize it on its own
            answer_ids = tokenizer(self.answer_separator + answer, add_special_tokens=False)["input_ids"]
            full_ids = torch.cat([prompt_ids, torch.tensor(answer_ids, dtype=torch.long)])
        if len(full_ids) == n:
            raise UserError("an answer encodes to no tokens")
        return Encoded(full_ids, n)

    # -- model pieces
    def vision_features(self, model, pixel: dict) -> torch.Tensor:
        """Pre-projector features of one image: [tokens, features]."""
        raise NotImplementedError

    def vision_features_batch(self, model, pixels: list[dict]) -> list[torch.Tensor]:
        """vision_features of several pictures (a family may run them as one batch)."""
        return [self.vision_features(model, p) for p in pixels]

    def project(self, params: dict[str, torch.Tensor], features: torch.Tensor) -> torch.Tensor:
        """The projector as a function of its parameters (module-relative names)."""
        raise NotImplementedError

    def position_ids(self, model, input_ids, attention_mask, pixels: list[dict]) -> torch.Tensor | None:
        return None

    def generate_inputs(self, model, input_ids, pixel: dict | None) -> dict:
        """Keyword arguments for `model.generate` on one prompt."""
        raise NotImplementedError


def all_adapters() -> list[Adapter]:
    from .llava import LlavaAdapter
    from .qwen2_vl import Qwen2VLAdapter

    return [LlavaAdapter(), Qwen2VLAdapter()]


def adapter_for(model_type: str | None) -> Adapter:
    for adapter in all_adapters():
        if model_type in adapter.model_types:
            return adapter
    supported = ", ".join(t for a in all_adapters() for t in a.model_types)
    raise UserError(f"model_type {model_type!r} has no fastunlearn adapter (supported: {supported})")


def stored_projector_names(adapter: Adapter, module_names: list[str], stored: list[str]) -> dict[str, str]:
    """Map the projector's module-relative parameter names to stored tensor names.

    transformers renames keys in memory (`model.multi_modal_projector.*` vs stored
    `multi_modal_projector.*`), so names are resolved from the file headers: a stored name matches
    when it is `prefix + name` or ends with `.prefix + name`.
    """
    mapping = {}
    for name in module_names:
        full = adapter.projector_prefix + name
        hits = [s for s in stored if s == full or s.endswith("." + full)]
        if len(hits) != 1:
            what = "no stored tensor" if not hits else f"several stored tensors ({', '.join(hits)})"
            raise UserError(f"projector parameter {full!r}: {what} in the checkpoint; is config.json right?")
        mapping[name] = hits[0]
    return mapping
