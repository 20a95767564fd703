"""The adapter interface: what a family's adapter knows (see the package's docstring), and the
defaults most families share."""
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
    answer_separator: str | None = ""  # text between the generation prompt and the answer (None: by the prompt's end)
    # `--scope vision:K` (scope.py): the edited tower layers, (index, layer), kept when the tower is dropped,
    # and the stems of their stored names
    edited: tuple = ()
    edited_stems: tuple[str, ...] = ()
    tower_after = None  # the stack's `after` module, kept too

    # -- loading
    def load_processor(self, ckpt: Path):
        raise NotImplementedError

    def projector_module(self, model) -> torch.nn.Module:
        raise NotImplementedError

    def check_config(self, config) -> None:
        """Raise UserError for configurations this adapter cannot handle."""

    def connector_ignored(self, model) -> str:
        """What to tell the user when the forget answers' gradient with respect to the connector is zero
        (families add what in the model's weights shuts the pictures out)."""
        return ("the forget answers' gradient with respect to the connector is zero: they do not depend on it, so "
                "editing it cannot erase anything")

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

    def placeholder(self, processor, model_config) -> str:
        """The image placeholder the prompt template writes (once per picture)."""
        return processor.tokenizer.convert_ids_to_tokens(model_config.image_token_id)

    def image_text(self, processor, model_config, pixel: dict) -> str:
        """What the placeholder expands to for this picture."""
        return self.placeholder(processor, model_config) * self.n_image_tokens(processor, model_config, pixel)

    def expand_prompt(self, processor, model_config, prompt: str, pixel: dict) -> str:
        """The prompt with its one image placeholder expanded."""
        return prompt.replace(self.placeholder(processor, model_config), self.image_text(processor, model_config, pixel))

    def encode(self, processor, model_config, pixel: dict | None, question: str, answer: str | None) -> Encoded:
        """Token ids of prompt (+ answer), image placeholders expanded, answer token-aligned."""
        tokenizer = processor.tokenizer
        prompt = self.prompt(processor, question, pixel is not None)
        separator = self.answer_separator
        if separator is None:  # "Assistant:" / "ASSISTANT" + " answer"; after a newline or a special token, directly
            separator = " " if prompt[-1:] == ":" or prompt[-1:].isalnum() else ""
        if pixel is not None:
            placeholder = self.placeholder(processor, model_config)
            if prompt.count(placeholder) != 1:
                raise UserError(f"the prompt template must hold the image placeholder {placeholder!r} once")
            prompt = self.expand_prompt(processor, model_config, prompt, pixel)

        def ids(text):
            return torch.tensor(tokenizer(text)["input_ids"], dtype=torch.long)

        prompt_ids = ids(prompt)
        n = len(prompt_ids)
        if answer is None:
            return Encoded(prompt_ids, n)
        full_ids = ids(prompt + separator + answer)
        if len(full_ids) <= n or not torch.equal(full_ids[:n], prompt_ids):
            # the answer merged with the prompt's last token: tokenize it on its own
            answer_ids = tokenizer(separator + answer, add_special_tokens=False)["input_ids"]
            full_ids = torch.cat([prompt_ids, torch.tensor(answer_ids, dtype=torch.long)])
        if len(full_ids) == n:
            raise UserError("an answer encodes to no tokens")
        return Encoded(full_ids, n)

    def is_projector_name(self, stored_name: str) -> bool:
        """Is a stored tensor part of the edit's room: the connector, or an edited tower layer (in either
        Hub layout: `X` or `model.X`)?"""
        stems = self.connector_paths() + self.edited_stems
        names = (stored_name, without_vision_model(stored_name))
        return any(n.startswith(p) or ("." + p) in n for n in names for p in stems)

    def connector_paths(self) -> tuple[str, ...]:
        """Stored-name stems of the connector's tensors (default: the projector prefix)."""
        return (self.projector_prefix,)

    # -- model pieces
    def tower_stack(self, model):
        """The vision tower's plain stack of layers, for `--scope vision:K` (a scope.TowerStack)."""
        raise UserError(f"--scope vision:K: not available for {self.family} checkpoints (fastunlearn runs their "
                        "tower only through the family's own code); use --scope connector")

    def logit_scale(self, model) -> float:
        """The factor the family's forward multiplies the lm_head's logits by (1 for most)."""
        return 1.0

    def vision_features(self, model, pixel: dict) -> torch.Tensor:
        """Pre-projector features of one image: [rows, features]. Everything the frozen vision side
        computes, so that the connector is the only function of the trained parameters."""
        raise NotImplementedError

    def vision_features_batch(self, model, pixels: list[dict]) -> list[torch.Tensor]:
        """vision_features of several pictures (the views of one picture): one tower call where the
        family can batch them, else one call each."""
        return [self.vision_features(model, p) for p in pixels]

    def project(self, params: dict[str, torch.Tensor], features: torch.Tensor, grid: dict | None = None) -> torch.Tensor:
        """The projector as a function of its parameters (module-relative names), on one picture's
        features (`grid`: that picture's layout, for families whose projector needs it)."""
        raise NotImplementedError

    def project_images(self, model, params: dict[str, torch.Tensor], features: list[torch.Tensor],
                       grids: list[dict]) -> list[torch.Tensor]:
        """Projected tokens of each picture of a batch, [tokens, hidden] each, in sequence order."""
        return [self.project(params, f, g) for f, g in zip(features, grids)]

    def project_each(self, model, params, features: list[torch.Tensor], grids: list[dict]) -> list[torch.Tensor]:
        """project_images, where `params` may also be a list of parameter dicts, one per picture (each
        picture through its own copy: per-sample gradients in one pass, mask.fisher_diagonal)."""
        if isinstance(params, dict):
            return self.project_images(model, params, features, grids)
        return [self.project_images(model, p, [f], [g])[0] for p, f, g in zip(params, features, grids)]

    def drop_vision_tower(self, model) -> None:
        """Free the vision model once the features are cached (the connector stays usable)."""
        for attr in ("vision_tower", "visual", "vision_model"):
            if getattr(model.model, attr, None) is not None:
                setattr(model.model, attr, None)

    def connector_inputs(self, model, params: dict[str, torch.Tensor], features: list[torch.Tensor],
                         grids: list[dict], inputs: dict | None = None) -> dict:
        """Keyword arguments that bring the projected pictures into the model's forward. Default: the
        precomputed connector outputs (transformers' `mm_encoder_outputs`), which the family's forward
        scatters into the image placeholders itself. `inputs`: the batch's `model_inputs`."""
        from transformers.modeling_outputs import BaseModelOutputWithPooling

        projected = self.project_each(model, params, features, grids)
        return {"mm_encoder_outputs": {"image": BaseModelOutputWithPooling(pooler_output=projected)}}

    def model_inputs(self, model, input_ids, attention_mask, grids: list[dict | None], answer_starts: list[int]) -> dict:
        """Extra keyword arguments of the forward for a right-padded batch (`grids`: per sequence, None
        without a picture; `answer_starts`: where each answer begins), computed once per batch:
        position ids, token types, image layout."""
        positions = self.position_ids(model, input_ids, attention_mask, grids)
        return {} if positions is None else {"position_ids": positions}

    def position_ids(self, model, input_ids, attention_mask, pixels: list[dict]) -> torch.Tensor | None:
        return None

    def generate_inputs(self, model, input_ids, pixel: dict | None) -> dict:
        """Keyword arguments for `model.generate` on one prompt."""
        raise NotImplementedError


def without_vision_model(name: str) -> str:
    """A stored name without CLIP's or SigLIP's `vision_model.` level, which transformers 5 drops in
    memory (so the edited layers' stems lack it) while Hub files keep it."""
    return name.replace(".vision_model.", ".")


def clip_like_tower(model) -> tuple[str, torch.nn.Module]:
    """The stem of a CLIP- or SigLIP-style tower's encoder layers (`vision_tower[.vision_model].encoder.layers`,
    as this transformers version holds them; Idefics' `vision_model.encoder.layers`) and the module that has
    `encoder`."""
    attr = "vision_tower" if getattr(model.model, "vision_tower", None) is not None else "vision_model"
    tower = getattr(model.model, attr)
    inner = "vision_model." if hasattr(tower, "vision_model") else ""
    return f"{attr}.{inner}encoder.layers", getattr(tower, "vision_model", tower)
