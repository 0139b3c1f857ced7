"""The reference every token-exact VLM test compares against: transformers' own ``generate``,
greedy, on one request alone, from the chat its model card writes, through the checkpoint's own
processor and chat template. Written from the cards, not from ragws's adapters."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from PIL import Image

from ragws.models import paddleocr_vl, qwen2_vl

#: The modes that ask for a checkpoint's default task.
GENERIC_MODES = ("format", "plain")
#: The end-of-turn and end-of-text tokens of the families' chats.
STOP_TOKENS = ("<|im_end|>", "<|endoftext|>", "</s>")


def vlm_chat(
    architecture: str, rgb: np.ndarray, mode: str, prompt: str | None = None
) -> list[dict[str, Any]]:
    """One image and one task as the family's card writes the chat: Qwen2-VL and Qwen2.5-VL
    with MinerU's system turn (olmOCR's page instruction before the image), PaddleOCR-VL with
    no system turn and the image first. ``prompt`` replaces the task's instruction."""
    image = {"type": "image", "image": Image.fromarray(rgb)}
    if architecture == "PaddleOCRVLForConditionalGeneration":
        mode = paddleocr_vl.DEFAULT_MODE if mode in GENERIC_MODES else mode
        text = paddleocr_vl.MODES[mode] if prompt is None else prompt
        return [{"role": "user", "content": [image, {"type": "text", "text": text}]}]
    mode = qwen2_vl.DEFAULT_MODES[architecture] if mode in GENERIC_MODES else mode
    task = qwen2_vl.MODES[mode]
    content = [image, {"type": "text", "text": task.instruction if prompt is None else prompt}]
    if task.text_first:
        content.reverse()
    return [
        {"role": "system", "content": qwen2_vl.SYSTEM_PROMPT},
        {"role": "user", "content": content},
    ]


def chat_stop_ids(tokenizer: Any) -> list[int]:
    """The ids of :data:`STOP_TOKENS` the tokenizer has."""
    vocab = tokenizer.get_vocab()
    return sorted(vocab[token] for token in STOP_TOKENS if token in vocab)


def generate_alone(
    model: Any,
    processor: Any,
    messages: list[dict[str, Any]],
    max_tokens: int,
    stop_ids: list[int] | None = None,
    **options: Any,
) -> tuple[list[int], list[int]]:
    """(prompt ids, output ids) of greedy ``generate`` on one chat; ``stop_ids`` default to
    :func:`chat_stop_ids`, ``options`` go to ``generate``."""
    inputs = processor.apply_chat_template(
        messages, add_generation_prompt=True, tokenize=True, return_dict=True, return_tensors="pt"
    )
    return generate_inputs(model, processor, inputs, max_tokens, stop_ids, **options)


def generate_inputs(
    model: Any,
    processor: Any,
    inputs: Any,
    max_tokens: int,
    stop_ids: list[int] | None = None,
    **options: Any,
) -> tuple[list[int], list[int]]:
    """(prompt ids, output ids) of greedy ``generate`` on one request's processed inputs."""
    tokenizer = processor.tokenizer
    with torch.inference_mode():
        out = model.generate(
            **inputs,
            do_sample=False,
            max_new_tokens=max_tokens,
            eos_token_id=chat_stop_ids(tokenizer) if stop_ids is None else stop_ids,
            pad_token_id=tokenizer.pad_token_id,
            **options,
        )
    prompt = inputs["input_ids"][0].tolist()
    return prompt, out[0, len(prompt) :].tolist()
