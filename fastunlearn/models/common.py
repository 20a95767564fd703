"""What most families share: the checkpoint's own processor expands the image placeholder
(`replace_image_token`), the features entering the connector are captured at the connector's input
while the family's own `get_image_features` runs, and the connector runs as the family's own module
with the job's parameters (`torch.func.functional_call`), so no formula is re-implemented."""
from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn

from ..errors import UserError
from ..scope import TOWER, TowerStack, run_layers
from .base import Adapter, clip_like_tower


class Connector(nn.Module):
    """The connector's parts under one module, by their names in `model.model` (parameters shared,
    nothing copied): e.g. `multi_modal_projector` and `image_newline` for LLaVA-NeXT."""

    def __init__(self, **parts):
        super().__init__()
        for name, part in parts.items():
            if isinstance(part, nn.Parameter):
                self.register_parameter(name, part)
            else:
                self.add_module(name, part)


def call(module: nn.Module, params: dict[str, torch.Tensor], prefix: str, *args, **kwargs):
    """`module(*args, **kwargs)` with the parameters `params[prefix + name]` in place of its own (the
    edited tower layers' `tower.*` entries are not the connector's)."""
    own = {k[len(prefix):]: v for k, v in params.items() if k.startswith(prefix) and not k.startswith(TOWER)}
    return torch.func.functional_call(module, own, args, kwargs)


def siglip_stack(model) -> TowerStack:
    """SigLIP's encoder layers where the LLM reads the tower's last hidden state (PaliGemma, Gemma 3, Idefics):
    its features pass through every layer, then the post-LayerNorm, which stays as stored."""
    path, vision = clip_like_tower(model)
    return TowerStack(path, vision.encoder.layers, len(vision.encoder.layers), after=vision.post_layernorm)


def siglip_layers(adapter, params, hidden: torch.Tensor) -> torch.Tensor:
    """The edited layers on their cached input [crops, tokens, width], then the post-LayerNorm: the
    connector's input."""
    return after_tower(adapter, run_layers(adapter.edited, params, hidden, attention_mask=None))


def after_tower(adapter, hidden: torch.Tensor) -> torch.Tensor:
    """The stack's frozen norm after the layer read (`TowerStack.after`; none for most)."""
    return hidden if adapter.tower_after is None else frozen(adapter.tower_after, hidden)


def frozen(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """`module(x)` with its stored parameters in x's precision (the masters')."""
    return torch.func.functional_call(module, {n: p.to(x.dtype) for n, p in module.named_parameters()}, (x,))


def rotary_split(features: torch.Tensor, width: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(hidden, cos, sin) of an edited layer's cached input, [hidden | cos | sin] on the feature axis."""
    return features[..., :width], *features[..., width:].chunk(2, dim=-1)


def attends_everywhere(mask) -> bool:
    """Does this attention mask (None, boolean, or additive) let every token attend to every other?"""
    return mask is None or bool(mask.all() if mask.dtype == torch.bool else (mask == 0).all())


class _Captured(Exception):
    pass


def to_device(value, model):
    if isinstance(value, torch.Tensor):
        return value.to(model.device, model.dtype if value.is_floating_point() else value.dtype)
    return value


def read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text(encoding="utf-8")) if path.exists() else {}
    except (OSError, ValueError) as e:
        raise UserError(f"{path}: unreadable ({e.__class__.__name__})") from None


class ProcessorAdapter(Adapter):
    """A family whose processor class `processor_class` expands `processor.image_token`."""

    processor_class: str = ""
    processor_module: str = ""  # transformers.models.<this>.processing_<this> holds processor_class
    projector_attr: str = "multi_modal_projector"  # the connector module in `model.model`
    projector_prefix = "multi_modal_projector."
    answer_separator = None  # by the prompt's end
    feature_keys: tuple[str, ...] = ("pixel_values",)  # image-processor outputs `get_image_features` takes
    needs_video_processor = False  # the processor class also takes a video processor (which needs torchvision)

    # -- loading
    def load_processor(self, ckpt):
        """The checkpoint's processor (AutoProcessor). When that cannot be built here (its class also
        wants a video processor, which needs torchvision), the family's processor class is built from
        the checkpoint's tokenizer, image processor, processor settings and chat template without one."""
        from transformers import AutoProcessor

        ckpt = Path(ckpt)
        settings = self.processor_files(ckpt)
        derived = self.missing_settings(ckpt, settings)
        try:
            processor = AutoProcessor.from_pretrained(ckpt, trust_remote_code=False, **derived)
            if hasattr(processor, "image_processor") and hasattr(processor, "tokenizer"):
                return processor
        except Exception:  # noqa: BLE001 - any failure: build it from its parts below
            pass
        return self.processor_from_parts(ckpt, {**derived, **settings})

    def settings_from_config(self, config) -> dict:
        """Processor settings that the model's config fixes (how many tokens the connector makes per
        picture or tile), by their processor_config.json names."""
        return {}

    def missing_settings(self, ckpt: Path, settings: dict) -> dict:
        """settings_from_config's values for the keys processor_config.json (`settings`) lacks: without
        them the processor's class defaults (a released model's token count) would be used."""
        from transformers import AutoConfig

        wanted = self.settings_from_config(AutoConfig.from_pretrained(ckpt, trust_remote_code=False))
        return {k: v for k, v in wanted.items() if k not in settings}

    def processor_files(self, ckpt: Path) -> dict:
        """Check that the checkpoint holds a tokenizer and an image processor; its processor settings."""
        if not any((ckpt / f).exists() for f in ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")):
            raise UserError(f"{ckpt}: no tokenizer.json or tokenizer_config.json; copy the tokenizer files into the checkpoint")
        settings = read_json(ckpt / "processor_config.json")
        if not (ckpt / "preprocessor_config.json").exists() and "image_processor" not in settings:
            raise UserError(f"{ckpt}: no preprocessor_config.json (nor an image_processor entry in processor_config.json); "
                            "copy the image processor files into the checkpoint")
        return settings

    def processor_from_parts(self, ckpt: Path, settings: dict):
        from transformers import AutoImageProcessor, AutoTokenizer

        try:
            tokenizer = AutoTokenizer.from_pretrained(ckpt)
            image_processor = AutoImageProcessor.from_pretrained(ckpt)
        except Exception as e:  # noqa: BLE001 - transformers raises many types for unreadable files
            raise UserError(f"{ckpt}: cannot load the tokenizer or image processor ({str(e).splitlines()[0][:200]})") from None
        kwargs = {k: v for k, v in settings.items()
                  if k not in ("processor_class", "image_processor", "video_processor", "tokenizer", "auto_map")
                  and not isinstance(v, dict)}
        template = ckpt / "chat_template.jinja"
        if template.exists():
            kwargs["chat_template"] = template.read_text(encoding="utf-8")
        elif "chat_template" in read_json(ckpt / "chat_template.json"):
            kwargs["chat_template"] = read_json(ckpt / "chat_template.json")["chat_template"]
        elif getattr(tokenizer, "chat_template", None):
            kwargs["chat_template"] = tokenizer.chat_template
        return self.build_processor(tokenizer, image_processor, kwargs)

    def build_processor(self, tokenizer, image_processor, kwargs: dict):
        """The family's processor class, sub-processor type checks off and no video processor."""
        import importlib

        module = importlib.import_module(f"transformers.models.{self.processor_module}.processing_{self.processor_module}")
        cls = getattr(module, self.processor_class)
        bare = type(cls.__name__, (cls,), {"check_argument_for_proper_class": lambda self, name, arg: None})
        if self.needs_video_processor:
            kwargs["video_processor"] = None
        try:
            return bare(image_processor=image_processor, tokenizer=tokenizer, **kwargs)
        except (TypeError, ValueError, AttributeError) as e:
            raise UserError(f"cannot build the checkpoint's {self.processor_class} ({str(e).splitlines()[0][:200]})") from None

    def projector_module(self, model):
        return getattr(model.model, self.projector_attr)

    def hooked_module(self, model) -> nn.Module:
        """The module whose input is the connector's input (captured by `vision_features`)."""
        return getattr(model.model, self.projector_attr)

    pooler_output_tensor = False  # the family's forward takes the connector output as one tensor, not a list

    def connector_inputs(self, model, params, features, grids, inputs=None):
        out = super().connector_inputs(model, params, features, grids, inputs)
        if self.pooler_output_tensor:
            image = out["mm_encoder_outputs"]["image"]
            image.pooler_output = torch.cat(image.pooler_output)
        return out

    # -- text
    def placeholder(self, processor, model_config):
        return processor.image_token

    def image_text(self, processor, model_config, pixel):
        return processor.replace_image_token(pixel, image_idx=0)

    # -- features
    def feature_inputs(self, model, pixel: dict) -> dict:
        return {k: to_device(pixel[k], model) for k in self.feature_keys if k in pixel}

    @torch.no_grad()
    def vision_features(self, model, pixel):
        """The connector's input while the family's own `get_image_features` runs, [rows, features]; with
        edited tower layers (`tower_stack`), the first one's input instead, every token of every tile, and
        its rotary cos and sin beside it where it takes them."""
        captured = {}

        def hook(module, args, kwargs):
            captured["args"], captured["kwargs"] = args, kwargs
            raise _Captured

        hooked = self.edited[0][1] if self.edited else self.hooked_module(model)
        handle = hooked.register_forward_pre_hook(hook, with_kwargs=True)
        try:
            model.model.get_image_features(**self.feature_inputs(model, pixel))
        except _Captured:
            pass
        finally:
            handle.remove()
        if "args" not in captured:
            raise UserError("the vision tower's output never reached the connector")
        if self.edited:
            args, kwargs = captured["args"], captured["kwargs"]
            x = args[0] if args else kwargs["hidden_states"]
            if not attends_everywhere(args[1] if len(args) > 1 else kwargs.get("attention_mask")):
                # the edited layers run unmasked: every token of every tile must be real
                raise UserError("--scope vision:K: this picture's tiles hold padding, which the edited tower layers would "
                                "attend to; use --scope connector, or pictures the processor does not pad")
            rotary = kwargs.get("position_embeddings") or ()  # (cos, sin), one row per token
            return torch.cat([x.reshape(-1, x.shape[-1]), *(r.reshape(len(r), -1) for r in rotary)], dim=-1)
        x = captured["args"][0] if captured["args"] else next(iter(captured["kwargs"].values()))
        return self.features_of(x, captured["kwargs"])

    batch_views = False  # pictures of one size go through `get_image_features` together (tested per family)

    def vision_features_batch(self, model, pixels):
        """With `batch_views`, pictures whose processor outputs have equal shapes in one call: each
        picture's connector input is an equal, contiguous share of the batched one."""
        shapes = {tuple((k, tuple(v.shape)) for k, v in sorted(p.items()) if isinstance(v, torch.Tensor)) for p in pixels}
        if not self.batch_views or len(pixels) < 2 or len(shapes) != 1:
            return super().vision_features_batch(model, pixels)
        joint = {k: torch.cat([p[k] for p in pixels]) for k in pixels[0] if isinstance(pixels[0][k], torch.Tensor)}
        return list(self.vision_features(model, joint).chunk(len(pixels)))

    def features_of(self, x: torch.Tensor, kwargs: dict) -> torch.Tensor:
        """The cached form of the connector's input `x` (and its other keyword inputs): [rows, features]."""
        return x.reshape(-1, x.shape[-1])

    def project_images(self, model, params, features, grids):
        module = self.projector_module(model)
        return [self.project_one(model, module, params, f, g) for f, g in zip(features, grids)]

    def project_one(self, model, module, params, features, grid) -> torch.Tensor:
        """One picture's connector output, [tokens, hidden] (default: the module on its cached input)."""
        out = call(module, params, "", features)
        return out.reshape(-1, out.shape[-1])

    def generate_inputs(self, model, input_ids, pixel):
        inputs = {"input_ids": input_ids[None], "attention_mask": torch.ones_like(input_ids)[None]}
        if pixel is not None:
            inputs.update(self.feature_inputs(model, pixel))
        return inputs


class SiglipAdapter(ProcessorAdapter):
    """A family whose connector reads SigLIP's last hidden state of each picture (PaliGemma, DeepSeek-VL):
    `--scope vision:K` runs SigLIP's last K layers on the picture's cached input, then its post-LayerNorm."""

    def tower_stack(self, model):
        return siglip_stack(model)

    def project_one(self, model, module, params, features, grid):
        if self.edited:
            features = siglip_layers(self, params, features[None])[0]
        return super().project_one(model, module, params, features, grid)
