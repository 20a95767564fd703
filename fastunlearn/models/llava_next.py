"""LLaVA-NeXT (model_type "llava_next") and LLaVA-OneVision ("llava_onevision"): the LLaVA MLP on each
anyres tile, then the parameter-free unpad/arrange step, with the learned `image_newline` appended
to each row of the grid.

Connector (both may change): `multi_modal_projector.linear_{1,2}.{weight,bias}` and `image_newline`
(it enters the LLM directly, as an image token). Features: the tower's selected hidden states of
every tile (base + grid), as the family's `get_image_features` selects them. The arranging step is
the model's own `pack_image_features`, run on the projected tiles with the job's `image_newline`
(OneVision's anyres_max_9 downscale of large grids included). `--scope vision:K`: the tower is
LLaVA's (CLIP or SigLIP layers read at `vision_feature_layer`), run on every tile."""
from __future__ import annotations

from .common import Connector, ProcessorAdapter, call
from .llava import clip_layers, clip_stack


class LlavaNextAdapter(ProcessorAdapter):
    family = "llava_next"
    model_types = ("llava_next",)
    processor_class = "LlavaNextProcessor"
    processor_module = "llava_next"
    projector_prefix = ""
    feature_keys = ("pixel_values", "image_sizes")

    def connector_paths(self):
        return ("multi_modal_projector.", "image_newline")

    def projector_module(self, model):
        return Connector(multi_modal_projector=model.model.multi_modal_projector, image_newline=model.model.image_newline)

    def hooked_module(self, model):
        return model.model.multi_modal_projector

    def tower_stack(self, model):
        return clip_stack(model)

    def pack(self, model, tiles, grid, newline):
        packed, _ = model.model.pack_image_features([tiles], grid["image_sizes"], model.config.vision_feature_select_strategy,
                                                    image_newline=newline)
        return packed[0]

    def project_one(self, model, module, params, features, grid):
        import importlib

        family = importlib.import_module(type(model.model).__module__)
        n_tiles = family.image_size_to_num_patches(grid["image_sizes"][0], model.config.image_grid_pinpoints,
                                                   model.config.vision_config.image_size)
        tiles = features.view(n_tiles, -1, features.shape[-1])
        if self.edited:
            tiles = clip_layers(model, self.edited, params, tiles)
        tiles = call(module.multi_modal_projector, params, "multi_modal_projector.", tiles)
        return self.pack(model, tiles, grid, params["image_newline"])


class LlavaOnevisionAdapter(LlavaNextAdapter):
    family = "llava_onevision"
    model_types = ("llava_onevision",)
    processor_class = "LlavaOnevisionProcessor"
    processor_module = "llava_onevision"
    needs_video_processor = True

    def pixel_inputs(self, processor, image):
        pixel = dict(processor.image_processor(images=[image], return_tensors="pt"))
        pixel.setdefault("batch_num_images", [1])
        return pixel

    def pack(self, model, tiles, grid, newline):
        packed, _ = model.model.pack_image_features([tiles], grid["image_sizes"], image_newline=newline,
                                                    vision_aspect_ratio=model.config.vision_aspect_ratio)
        return packed[0]


class LlavaNextVideoAdapter(LlavaNextAdapter):
    """LLaVA-NeXT-Video (model_type "llava_next_video") on pictures: the LLaVA-NeXT image path; its
    processor also wants a video processor, so it is built without one."""

    family = "llava_next_video"
    model_types = ("llava_next_video",)
    processor_class = "LlavaNextVideoProcessor"
    processor_module = "llava_next_video"
    needs_video_processor = True
