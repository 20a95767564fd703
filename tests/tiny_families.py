"""Tiny checkpoints of the real transformers classes of each image-text-to-text family, with random
weights, built offline: config, model, tokenizer (a byte-level BPE trained on the synthetic world's
texts, with the family's special tokens and a chat template) and the family's image processor
(PIL backend), saved as a Hugging Face checkpoint folder. Nothing is downloaded."""
from __future__ import annotations

import functools
import json
from pathlib import Path

import torch

from fastunlearn.worlds import people as world
from fastunlearn.worlds import training

T = dict(vocab_size=None, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
         intermediate_size=37, max_position_embeddings=512, tie_word_embeddings=False)
V = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=37)


def chat_template(image: str, bos: str = "") -> str:
    """`{bos}User:{image}{question}\\nAssistant:`; the image written as `image`."""
    return (
        f"{bos}"
        "{% for message in messages %}{{ message['role'] | capitalize }}:"
        "{% if message['content'] is string %}{{ message['content'] }}{% else %}"
        "{% for c in message['content'] %}"
        f"{{% if c['type'] == 'image' %}}{image}{{% elif c['type'] == 'text' %}}{{{{ c['text'] }}}}{{% endif %}}"
        "{% endfor %}{% endif %}\n{% endfor %}"
        "{% if add_generation_prompt %}Assistant:{% endif %}"
    )


@functools.lru_cache(maxsize=None)
def _bpe(specials: tuple[str, ...]):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    texts = [f"User:{q}\nAssistant: {a}" for q, a in [(world.VISUAL_QUESTION, p["name"]) for p in world.PEOPLE]]
    texts += [f"User:{q}\nAssistant: {a}" for _, q, a in world.all_text_facts()] + ["Describe this image."]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, min_frequency=1, show_progress=False, special_tokens=list(specials),
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(texts * 4, trainer)
    return tok.to_str()


def tokenizer(specials: list[str], template: str, **attrs):
    """A PreTrainedTokenizerFast whose first special tokens are <pad> <s> </s> then `specials`;
    `attrs` become named special tokens (image_token=..., boi_token=...)."""
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast

    base = ["<pad>", "<s>", "</s>"]
    tok = Tokenizer.from_str(_bpe(tuple(base + specials)))
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", bos_token="<s>", eos_token="</s>",
                                   extra_special_tokens=attrs, chat_template=template, model_max_length=4096)


def ids(tok, *tokens):
    return [tok.convert_tokens_to_ids(t) for t in tokens]


def text_config(tok, **kw):
    return {**T, "vocab_size": len(tok), "pad_token_id": tok.pad_token_id, "bos_token_id": tok.bos_token_id,
            "eos_token_id": tok.eos_token_id, **kw}


def save(model, parts, out: Path, dtype=None, shard: str | None = None) -> Path:
    """save_pretrained the model (in `dtype`, sharded at `shard`) and each processor part."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    g = model.generation_config
    tok = getattr(parts[0], "tokenizer", parts[0])
    g.eos_token_id, g.pad_token_id, g.bos_token_id, g.do_sample = tok.eos_token_id, tok.pad_token_id, tok.bos_token_id, False
    if dtype is not None:
        model = model.to(dtype)
    model.save_pretrained(out, max_shard_size=shard or "10GB")
    for part in parts:
        if isinstance(part, dict):  # processor settings of a processor that cannot be built here
            (out / "processor_config.json").write_text(json.dumps(part, indent=2))
        else:
            part.save_pretrained(out)
    return out


# ---------------------------------------------------------------- the families


def llava_next():
    from transformers import LlavaNextConfig, LlavaNextForConditionalGeneration, LlavaNextProcessor
    from transformers.models.llava_next.image_processing_pil_llava_next import LlavaNextImageProcessorPil

    tok = tokenizer(["<image>"], chat_template("<image>", "<s>"), image_token="<image>")
    config = LlavaNextConfig(
        text_config={"model_type": "llama", **text_config(tok)},
        vision_config={"model_type": "clip_vision_model", **V, "image_size": 16, "patch_size": 4, "projection_dim": 32},
        image_grid_pinpoints=[[32, 32], [16, 32], [32, 16]], image_token_id=ids(tok, "<image>")[0],
        vision_feature_layer=-2, vision_feature_select_strategy="default", tie_word_embeddings=False)
    ip = LlavaNextImageProcessorPil(size={"shortest_edge": 16}, crop_size={"height": 16, "width": 16},
                                    image_grid_pinpoints=config.image_grid_pinpoints)
    processor = LlavaNextProcessor(image_processor=ip, tokenizer=tok, patch_size=4, vision_feature_select_strategy="default",
                                   num_additional_image_tokens=1,
                                   chat_template=tok.chat_template)
    return LlavaNextForConditionalGeneration(config), [processor]


def llava_onevision():
    from transformers import LlavaOnevisionConfig, LlavaOnevisionForConditionalGeneration
    from transformers.models.llava_onevision.image_processing_pil_llava_onevision import LlavaOnevisionImageProcessorPil

    tok = tokenizer(["<image>", "<video>"], chat_template("<image>", "<s>"), image_token="<image>", video_token="<video>")
    config = LlavaOnevisionConfig(
        text_config={"model_type": "qwen2", **text_config(tok)},
        vision_config={"model_type": "siglip_vision_model", **V, "image_size": 16, "patch_size": 4},
        image_grid_pinpoints=[[16, 16], [32, 32]], image_token_id=ids(tok, "<image>")[0],
        video_token_id=ids(tok, "<video>")[0], vision_feature_layer=-1, vision_feature_select_strategy="full",
        tie_word_embeddings=False)
    ip = LlavaOnevisionImageProcessorPil(size={"height": 16, "width": 16}, image_grid_pinpoints=config.image_grid_pinpoints)
    settings = dict(processor_class="LlavaOnevisionProcessor", num_image_tokens=16, vision_feature_select_strategy="full",
                    image_token="<image>", video_token="<video>", vision_aspect_ratio="anyres_max_9")
    return LlavaOnevisionForConditionalGeneration(config), [tok, ip, settings]


def mistral3():
    from transformers import Mistral3Config, Mistral3ForConditionalGeneration
    from transformers.models.pixtral.image_processing_pil_pixtral import PixtralImageProcessorPil

    tok = tokenizer(["[IMG]", "[IMG_BREAK]", "[IMG_END]"], chat_template("[IMG]", "<s>"), image_token="[IMG]")
    config = Mistral3Config(
        text_config={"model_type": "mistral", **text_config(tok), "head_dim": 8},
        vision_config={"model_type": "pixtral", **V, "image_size": 32, "patch_size": 4, "head_dim": 8},
        spatial_merge_size=2, image_token_id=ids(tok, "[IMG]")[0], vision_feature_layer=-1, tie_word_embeddings=False)
    ip = PixtralImageProcessorPil(size={"longest_edge": 32}, patch_size=8)
    settings = dict(processor_class="PixtralProcessor", patch_size=4, spatial_merge_size=2, image_token="[IMG]",
                    image_break_token="[IMG_BREAK]", image_end_token="[IMG_END]")
    return Mistral3ForConditionalGeneration(config), [tok, ip, settings]


def internvl():
    from transformers import InternVLConfig, InternVLForConditionalGeneration
    from transformers.models.got_ocr2.image_processing_pil_got_ocr2 import GotOcr2ImageProcessorPil

    tok = tokenizer(["<img>", "</img>", "<IMG_CONTEXT>", "<video>"], chat_template("<IMG_CONTEXT>", "<s>"),
                    start_image_token="<img>", end_image_token="</img>", context_image_token="<IMG_CONTEXT>",
                    video_token="<video>")
    config = InternVLConfig(
        text_config={"model_type": "qwen2", **text_config(tok)},
        vision_config={"model_type": "internvl_vision", **V, "image_size": [8, 8], "patch_size": [2, 2]},
        downsample_ratio=0.5, image_seq_length=4, image_token_id=ids(tok, "<IMG_CONTEXT>")[0],
        vision_feature_layer=-1, vision_feature_select_strategy="default", tie_word_embeddings=False)
    ip = GotOcr2ImageProcessorPil(size={"height": 8, "width": 8}, crop_to_patches=True, min_patches=1, max_patches=2)
    return InternVLForConditionalGeneration(config), [tok, ip, dict(processor_class="InternVLProcessor", image_seq_length=4)]


def paligemma():
    from transformers import PaliGemmaConfig, PaliGemmaForConditionalGeneration, PaliGemmaProcessor
    from transformers.models.siglip.image_processing_pil_siglip import SiglipImageProcessorPil

    tok = tokenizer(["<image>"], None, image_token="<image>")
    ip = SiglipImageProcessorPil(size={"height": 8, "width": 8})
    ip.image_seq_length = 16
    processor = PaliGemmaProcessor(image_processor=ip, tokenizer=tok)  # adds PaliGemma's <loc>/<seg> tokens
    config = PaliGemmaConfig(
        text_config={"model_type": "gemma", **text_config(tok), "head_dim": 8},
        vision_config={"model_type": "siglip_vision_model", **V, "image_size": 8, "patch_size": 2, "projection_dim": 32},
        projection_dim=32, image_token_index=ids(tok, "<image>")[0], tie_word_embeddings=False)
    return PaliGemmaForConditionalGeneration(config), [processor]


def gemma3():
    from transformers import Gemma3Config, Gemma3ForConditionalGeneration, Gemma3Processor
    from transformers.models.gemma3.image_processing_pil_gemma3 import Gemma3ImageProcessorPil

    tok = tokenizer(["<start_of_image>", "<end_of_image>", "<image_soft_token>"], chat_template("<start_of_image>", "<s>"),
                    boi_token="<start_of_image>", eoi_token="<end_of_image>", image_token="<image_soft_token>")
    boi, eoi, image = ids(tok, "<start_of_image>", "<end_of_image>", "<image_soft_token>")
    config = Gemma3Config(
        text_config={"model_type": "gemma3_text", **text_config(tok), "head_dim": 8, "sliding_window": 16},
        vision_config={"model_type": "siglip_vision_model", **V, "image_size": 8, "patch_size": 2},
        mm_tokens_per_image=4, boi_token_index=boi, eoi_token_index=eoi, image_token_index=image, tie_word_embeddings=False)
    ip = Gemma3ImageProcessorPil(size={"height": 8, "width": 8})
    processor = Gemma3Processor(image_processor=ip, tokenizer=tok, image_seq_length=4, chat_template=tok.chat_template)
    model = Gemma3ForConditionalGeneration(config)
    with torch.no_grad():  # initialised to zeros: pictures would not reach the LLM at all
        model.model.multi_modal_projector.mm_input_projection_weight.normal_(0, 0.5)
    return model, [processor]


ROW_COL = [f"<row_{i}_col_{j}>" for i in (1, 2) for j in (1, 2)]


def idefics3():
    from transformers import Idefics3Config, Idefics3ForConditionalGeneration, Idefics3Processor
    from transformers.models.idefics3.image_processing_pil_idefics3 import Idefics3ImageProcessorPil

    tok = tokenizer(["<fake_token_around_image>", "<image>", "<global-img>", "<end_of_utterance>", *ROW_COL],
                    chat_template("<image>", "<s>"))
    config = Idefics3Config(
        text_config={"model_type": "llama", **text_config(tok)},
        vision_config={**V, "image_size": 8, "patch_size": 2}, scale_factor=2, image_token_id=ids(tok, "<image>")[0],
        tie_word_embeddings=False)
    ip = Idefics3ImageProcessorPil(size={"longest_edge": 16}, max_image_size={"longest_edge": 8})
    processor = Idefics3Processor(image_processor=ip, tokenizer=tok, image_seq_len=4, chat_template=tok.chat_template)
    return Idefics3ForConditionalGeneration(config), [processor]


def smolvlm():
    from transformers import SmolVLMConfig, SmolVLMForConditionalGeneration
    from transformers.models.smolvlm.image_processing_pil_smolvlm import SmolVLMImageProcessorPil

    tok = tokenizer(["<fake_token_around_image>", "<image>", "<global-img>", "<end_of_utterance>", *ROW_COL],
                    chat_template("<image>", "<s>"), fake_image_token="<fake_token_around_image>", image_token="<image>",
                    global_image_token="<global-img>")
    config = SmolVLMConfig(
        text_config={"model_type": "llama", **text_config(tok)},
        vision_config={**V, "image_size": 8, "patch_size": 2}, scale_factor=2, image_token_id=ids(tok, "<image>")[0],
        tie_word_embeddings=False)
    ip = SmolVLMImageProcessorPil(size={"longest_edge": 16}, max_image_size={"longest_edge": 8})
    return SmolVLMForConditionalGeneration(config), [tok, ip, dict(processor_class="SmolVLMProcessor", image_seq_len=4)]


def _qwen(family, config_cls, model_cls, vision, text, size, patch):
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    tok = training.build_tokenizer("qwen2_vl")
    specials = {k: tok.convert_tokens_to_ids(v) for k, v in training.QWEN_SPECIALS.items()}
    config = config_cls(
        text_config={**text_config(tok), "bos_token_id": specials["im_start"], **text},
        vision_config={"depth": 2, "hidden_size": 32, "num_heads": 4, "intermediate_size": 37, "patch_size": patch,
                       "spatial_merge_size": 2, "temporal_patch_size": 2, "out_hidden_size": 32, **vision},
        image_token_id=specials["image"], video_token_id=specials["video"], vision_start_token_id=specials["vision_start"],
        vision_end_token_id=specials["vision_end"], tie_word_embeddings=False)
    ip = Qwen2VLImageProcessorPil(size={"shortest_edge": size * size, "longest_edge": size * size}, patch_size=patch,
                                  merge_size=2, temporal_patch_size=2)
    return model_cls(config), [tok, ip]


def qwen2_5_vl():
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    return _qwen("qwen2_5_vl", Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration,
                 {"window_size": 56, "fullatt_block_indexes": [1]},
                 {"rope_parameters": {"rope_type": "default", "mrope_section": [2, 1, 1], "rope_theta": 1e4}}, 112, 14)


def qwen3_vl():
    from transformers import Qwen3VLConfig, Qwen3VLForConditionalGeneration

    return _qwen("qwen3_vl", Qwen3VLConfig, Qwen3VLForConditionalGeneration,
                 {"num_position_embeddings": 16, "deepstack_visual_indexes": [0, 1]},
                 {"head_dim": 8, "num_hidden_layers": 3, "rope_parameters": {"rope_type": "default", "mrope_section": [2, 1, 1],
                                                     "mrope_interleaved": True, "rope_theta": 1e4}}, 64, 16)


def mllama(gate: float = 1.0):
    """`gate`: every cross-attention gate's value; 0 (as initialised) shuts pictures out of every answer."""
    from transformers import MllamaConfig, MllamaForConditionalGeneration, MllamaProcessor
    from transformers.models.mllama.image_processing_pil_mllama import MllamaImageProcessorPil

    tok = tokenizer(["<|image|>", "<|python_tag|>"], chat_template("<|image|>", "<s>"))
    config = MllamaConfig(
        text_config={**text_config(tok), "num_hidden_layers": 3, "cross_attention_layers": [1], "rope_parameters": {
            "rope_type": "default", "rope_theta": 1e4}},
        vision_config={"hidden_size": 16, "intermediate_size": 37, "num_attention_heads": 4, "num_hidden_layers": 2,
                       "num_global_layers": 1, "image_size": 16, "patch_size": 4, "intermediate_layers_indices": [0],
                       "max_num_tiles": 4,
                       "vision_output_dim": 32},
        image_token_index=ids(tok, "<|image|>")[0], tie_word_embeddings=False)
    ip = MllamaImageProcessorPil(size={"height": 16, "width": 16}, max_image_tiles=4)
    processor = MllamaProcessor(image_processor=ip, tokenizer=tok, chat_template=tok.chat_template)
    model = MllamaForConditionalGeneration(config)
    with torch.no_grad():  # tanh gates initialised to zero would shut the cross-attention off
        for layer in model.model.language_model.layers:
            for name in ("cross_attn_attn_gate", "cross_attn_mlp_gate"):
                if hasattr(layer, name):
                    getattr(layer, name).fill_(gate)
    return model, [processor]


def idefics2():
    from transformers import Idefics2Config, Idefics2ForConditionalGeneration, Idefics2Processor
    from transformers.models.idefics2.image_processing_pil_idefics2 import Idefics2ImageProcessorPil

    tok = tokenizer(["<fake_token_around_image>", "<image>", "<end_of_utterance>"], chat_template("<image>", "<s>"))
    config = Idefics2Config(
        text_config={"model_type": "mistral", **text_config(tok), "head_dim": 8},
        vision_config={**V, "image_size": 8, "patch_size": 2},
        perceiver_config={"hidden_size": 32, "resampler_n_latents": 4, "resampler_depth": 2, "resampler_n_heads": 2,
                          "resampler_head_dim": 8, "num_key_value_heads": 1},
        image_token_id=ids(tok, "<image>")[0], tie_word_embeddings=False)
    ip = Idefics2ImageProcessorPil(size={"shortest_edge": 8, "longest_edge": 8}, do_image_splitting=True)
    processor = Idefics2Processor(image_processor=ip, tokenizer=tok, image_seq_len=4, chat_template=tok.chat_template)
    return Idefics2ForConditionalGeneration(config), [processor]


def aya_vision():
    from transformers import AyaVisionConfig, AyaVisionForConditionalGeneration, AyaVisionProcessor
    from transformers.models.got_ocr2.image_processing_pil_got_ocr2 import GotOcr2ImageProcessorPil

    marks = ["<|START_OF_IMG|>", "<|END_OF_IMG|>", "<|IMG_PATCH|>", "<|IMG_LINE_BREAK|>", "TILE", "TILE_GLOBAL"]
    tok = tokenizer(["<image>", *marks], chat_template("<image>", "<s>"))
    config = AyaVisionConfig(
        # Cohere2, as on the Hub; a logit scale other than 1 checks that the job's NLLs apply it
        text_config={"model_type": "cohere2", **text_config(tok), "logit_scale": 0.5, "layer_types": ["full_attention"] * 2},
        vision_config={"model_type": "siglip_vision_model", **V, "image_size": 8, "patch_size": 2},
        downsample_factor=2, vision_feature_layer=-1, vision_feature_select_strategy="full",
        image_token_id=ids(tok, "<|IMG_PATCH|>")[0], tie_word_embeddings=False)
    ip = GotOcr2ImageProcessorPil(size={"height": 8, "width": 8}, crop_to_patches=True, min_patches=1, max_patches=2)
    processor = AyaVisionProcessor(image_processor=ip, tokenizer=tok, patch_size=2, img_size=8, downsample_factor=2,
                                   chat_template=tok.chat_template)
    return AyaVisionForConditionalGeneration(config), [processor]


def deepseek_vl():
    from transformers import DeepseekVLConfig, DeepseekVLForConditionalGeneration, DeepseekVLProcessor
    from transformers.models.deepseek_vl.image_processing_pil_deepseek_vl import DeepseekVLImageProcessorPil

    tok = tokenizer(["<image_placeholder>"], chat_template("<image_placeholder>", "<s>"), image_token="<image_placeholder>")
    config = DeepseekVLConfig(
        text_config={"model_type": "llama", **text_config(tok)},
        vision_config={"model_type": "siglip_vision_model", **V, "image_size": 16, "patch_size": 4},
        image_token_id=ids(tok, "<image_placeholder>")[0], tie_word_embeddings=False)
    ip = DeepseekVLImageProcessorPil(size={"height": 16, "width": 16}, min_size=4)
    processor = DeepseekVLProcessor(image_processor=ip, tokenizer=tok, num_image_tokens=16, chat_template=tok.chat_template)
    return DeepseekVLForConditionalGeneration(config), [processor]


def glm4v():
    from transformers import Glm4vConfig, Glm4vForConditionalGeneration
    from transformers.models.glm4v.image_processing_pil_glm4v import Glm4vImageProcessorPil

    marks = ["<|begin_of_image|>", "<|end_of_image|>", "<|image|>", "<|begin_of_video|>", "<|end_of_video|>", "<|video|>"]
    tok = tokenizer(marks, chat_template("<|begin_of_image|><|image|><|end_of_image|>", "<s>"), image_token="<|image|>",
                    video_token="<|video|>")
    b, e, image, bv, ev, video = ids(tok, *marks)
    config = Glm4vConfig(
        text_config={**text_config(tok), "head_dim": 16, "rope_parameters": {"rope_type": "default", "mrope_section": [2, 1, 1],
                                                            "rope_theta": 1e4, "partial_rotary_factor": 0.5}},
        vision_config={"depth": 2, "hidden_size": 32, "num_heads": 4, "intermediate_size": 37, "patch_size": 14,
                       "image_size": 56, "spatial_merge_size": 2, "temporal_patch_size": 2, "out_hidden_size": 32},
        image_token_id=image, video_token_id=video, image_start_token_id=b, image_end_token_id=e,
        video_start_token_id=bv, video_end_token_id=ev, tie_word_embeddings=False)
    ip = Glm4vImageProcessorPil(size={"shortest_edge": 112 * 112, "longest_edge": 112 * 112}, patch_size=14, merge_size=2,
                                temporal_patch_size=2)
    return Glm4vForConditionalGeneration(config), [tok, ip, dict(processor_class="Glm4vProcessor")]


def qwen3_vl_moe():
    from transformers import Qwen3VLMoeConfig, Qwen3VLMoeForConditionalGeneration

    return _qwen("qwen3_vl_moe", Qwen3VLMoeConfig, Qwen3VLMoeForConditionalGeneration,
                 {"num_position_embeddings": 16, "deepstack_visual_indexes": [0, 1]},
                 {"head_dim": 8, "num_hidden_layers": 3, "num_experts": 4, "num_experts_per_tok": 2,
                  "moe_intermediate_size": 16, "rope_parameters": {"rope_type": "default", "mrope_section": [2, 1, 1],
                                                                   "mrope_interleaved": True, "rope_theta": 1e4}}, 64, 16)


def glm4v_moe():
    from transformers import Glm4vMoeConfig, Glm4vMoeForConditionalGeneration

    model, parts = glm4v()
    config = Glm4vMoeConfig(
        text_config={**model.config.text_config.to_dict(), "model_type": "glm4v_moe_text", "n_routed_experts": 4,
                     "num_experts_per_tok": 2, "moe_intermediate_size": 16, "first_k_dense_replace": 1,
                     "n_shared_experts": 1},
        vision_config=model.config.vision_config.to_dict(),
        **{k: getattr(model.config, k) for k in ("image_token_id", "video_token_id", "image_start_token_id",
                                                  "image_end_token_id", "video_start_token_id", "video_end_token_id")},
        tie_word_embeddings=False)
    return Glm4vMoeForConditionalGeneration(config), parts


def llava_next_video():
    from transformers import LlavaNextVideoConfig, LlavaNextVideoForConditionalGeneration

    model, (processor,) = llava_next()
    config = LlavaNextVideoConfig(
        text_config=model.config.text_config.to_dict(), vision_config=model.config.vision_config.to_dict(),
        image_grid_pinpoints=model.config.image_grid_pinpoints, image_token_id=model.config.image_token_id,
        video_token_id=model.config.image_token_id + 1, vision_feature_layer=-2,
        vision_feature_select_strategy="default", tie_word_embeddings=False)
    settings = dict(processor_class="LlavaNextVideoProcessor", patch_size=4, vision_feature_select_strategy="default",
                    num_additional_image_tokens=1, image_token="<image>", video_token="<image>")
    return LlavaNextVideoForConditionalGeneration(config), [processor.tokenizer, processor.image_processor, settings]


def vipllava():
    from transformers import LlavaProcessor, VipLlavaConfig, VipLlavaForConditionalGeneration
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

    tok = tokenizer(["<image>"], chat_template("<image>", "<s>"), image_token="<image>")
    config = VipLlavaConfig(
        text_config={"model_type": "llama", **text_config(tok)},
        vision_config={"model_type": "clip_vision_model", **V, "image_size": 8, "patch_size": 2, "projection_dim": 32},
        vision_feature_layers=[-2, -1], image_token_id=ids(tok, "<image>")[0], tie_word_embeddings=False)
    ip = CLIPImageProcessorPil(size={"shortest_edge": 8}, crop_size={"height": 8, "width": 8})
    processor = LlavaProcessor(image_processor=ip, tokenizer=tok, patch_size=2, vision_feature_select_strategy="default",
                               num_additional_image_tokens=1, chat_template=tok.chat_template)
    return VipLlavaForConditionalGeneration(config), [processor]


FAMILIES = {"qwen3_vl_moe": qwen3_vl_moe, "glm4v_moe": glm4v_moe, "llava_next_video": llava_next_video,
            "vipllava": vipllava, "glm4v": glm4v, "deepseek_vl": deepseek_vl, "aya_vision": aya_vision, "idefics2": idefics2, "mllama": mllama, "qwen2_5_vl": qwen2_5_vl, "qwen3_vl": qwen3_vl, "llava_next": llava_next, "llava_onevision": llava_onevision, "mistral3": mistral3, "internvl": internvl,
            "paligemma": paligemma, "gemma3": gemma3, "idefics3": idefics3, "smolvlm": smolvlm,
            "mllama_zero_gates": lambda: mllama(gate=0.0)}


# picture tiling as the family's Hub checkpoints ship it, scaled to the tiny towers (tile = vision image_size):
# SmolVLM / Idefics3 split a picture into up to 4x4 sub-images (size 4 x max_image_size), LLaVA-NeXT has
# llava-v1.6's five grids, LLaVA-OneVision up to 6x6 tiles (more than 9 are downscaled: anyres_max_9), and
# Gemma 3's pan-and-scan is on with the rest of its settings left null, as Hub files leave them
HUB_TILING = {
    "smolvlm": dict(do_image_splitting=True, size={"longest_edge": 32}),
    "idefics3": dict(do_image_splitting=True, size={"longest_edge": 32}),
    "llava_next": dict(image_grid_pinpoints=[[16, 32], [32, 16], [32, 32], [48, 16], [16, 48]]),
    "llava_onevision": dict(image_grid_pinpoints=[[16 * i, 16 * j] for i in range(1, 7) for j in range(1, 7)]),
    "gemma3": dict(do_pan_and_scan=True, pan_and_scan_min_crop_size=16),
}


def hub_tiling(family, model, parts) -> None:
    """Turn on HUB_TILING[family] in the image processor (and config.json's grid) before saving."""
    for part in parts:
        image_processor = getattr(part, "image_processor", part)
        if type(image_processor).__name__.endswith("ImageProcessorPil"):
            for key, value in HUB_TILING[family].items():
                setattr(image_processor, key, value)
    if "image_grid_pinpoints" in HUB_TILING[family]:
        model.config.image_grid_pinpoints = HUB_TILING[family]["image_grid_pinpoints"]


def build(family: str, out: Path, dtype=None, shard: str | None = None, seed: int = 0, tiling: bool = False) -> Path:
    """`tiling`: with HUB_TILING's settings."""
    torch.manual_seed(seed)
    model, parts = FAMILIES[family]()
    if tiling:
        hub_tiling(family, model, parts)
    return save(model.eval(), parts, out, dtype, shard)
