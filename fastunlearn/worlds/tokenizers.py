"""The synthetic worlds' tokenizers: a byte-level BPE trained on the world's texts, with the LLaVA-1.5
and Qwen2-VL special tokens and chat templates (used by training.py's model builders)."""

from __future__ import annotations

from .people import PEOPLE, VISUAL_QUESTION, all_text_facts

FAMILIES = ("llava", "qwen2_vl")

LLAVA_SPECIALS = dict(bos="<s>", eos="</s>", unk="<unk>", pad="<pad>", image="<image>")
QWEN_SPECIALS = dict(pad="<|endoftext|>", im_start="<|im_start|>", eos="<|im_end|>",
                     vision_start="<|vision_start|>", vision_end="<|vision_end|>",
                     image="<|image_pad|>", video="<|video_pad|>")

# LLaVA-1.5 (llava-hf) style: "<s>USER: <image>\n{question} ASSISTANT:", answer " {answer}</s>".
LLAVA_CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{% if message['role'] != 'system' %}{{ message['role'].upper() + ': ' }}{% endif %}"
    "{% if message['content'] is string %}{{ message['content'] + ' ' }}{% else %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'image') %}{{ '<image>\\n' }}{% endfor %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}{{ content['text'] + ' ' }}{% endfor %}"
    "{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ 'ASSISTANT:' }}{% endif %}"
)

# Qwen2-VL style without the default system turn:
# "<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|>{question}<|im_end|>\n<|im_start|>assistant\n"
QWEN_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}"
    "{% for content in message['content'] %}"
    "{% if content['type'] == 'image' or 'image' in content or 'image_url' in content %}"
    "<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif content['type'] == 'video' or 'video' in content %}"
    "<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif 'text' in content %}{{ content['text'] }}{% endif %}"
    "{% endfor %}{% endif %}<|im_end|>\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def _corpus(family: str) -> list[str]:
    """Texts the BPE is trained on: every prompt and answer as the templates write them."""
    lines = []
    for q, a in [(VISUAL_QUESTION, p["name"]) for p in PEOPLE] + [
            (q, a) for _, q, a in all_text_facts()] + [("Describe this image.", "")]:
        if family == "llava":
            lines += [f"USER: \n{q} ASSISTANT: {a}", f"USER: {q} ASSISTANT: {a}"]
        else:
            lines += [f"user\n{q}", f"user\n\n{q}", f"\nassistant\n{a}", f"system\n{q}"]
    return lines * 4


def build_tokenizer(family: str, vocab_size: int = 512, corpus: list[str] | None = None):
    """A byte-level BPE trained on the world's text, as a PreTrainedTokenizerFast.

    LLaVA: <s> <unk> <pad> <image> </s>; Qwen2-VL: <|endoftext|> (pad),
    <|im_start|>, <|im_end|> (eos), <|vision_start|>, <|vision_end|>,
    <|image_pad|>, <|video_pad|>. The family's chat template is set on it.
    Nothing is added automatically around encoded text (the LLaVA template
    writes <s> itself), so every way of encoding a prompt gives the same ids.
    `corpus` replaces the demo world's texts (another world's prompts and answers).
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    specials = LLAVA_SPECIALS if family == "llava" else QWEN_SPECIALS
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=1, show_progress=False,
                                  special_tokens=list(specials.values()),
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(_corpus(family) if corpus is None else corpus, trainer)
    if family == "llava":
        return PreTrainedTokenizerFast(
            tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>",
            pad_token="<pad>", extra_special_tokens={"image_token": "<image>"},
            chat_template=LLAVA_CHAT_TEMPLATE, padding_side="left", model_max_length=512)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>",
        extra_special_tokens={"image_token": "<|image_pad|>", "video_token": "<|video_pad|>",
                              "vision_start_token": "<|vision_start|>",
                              "vision_end_token": "<|vision_end|>"},
        chat_template=QWEN_CHAT_TEMPLATE, padding_side="left", model_max_length=512)
