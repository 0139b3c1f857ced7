"""A random-weight PaddleOCR-VL checkpoint of the real architecture, built offline.

The stand-in of ``PaddlePaddle/PaddleOCR-VL`` (``PaddleOCRVLForConditionalGeneration``) for tests
and benchmarks: the real model class at a tiny size (an ERNIE-4.5-style decoder with M-RoPE, 64
hidden × 2 layers, an explicit head_dim of 16 and 4 query / 2 KV heads, no biases; a 2-layer
SigLIP-NaViT vision tower with a learned 4 × 4 position table resampled to each image; the
2 × 2-merging projector), random weights, a byte-level BPE tokenizer with Paddle's special tokens
and the named ``image_token`` the processor requires, the real processor classes (image processor
with small pixel bounds and the checkpoint's mean/std of 0.5) and a chat template of the v1
layout, all written with ``save_pretrained``. The result loads with the real-checkpoint calls::

    model = PaddleOCRVLForConditionalGeneration.from_pretrained(out_dir)
    processor = AutoProcessor.from_pretrained(out_dir)
    inputs = processor.apply_chat_template(messages, add_generation_prompt=True,
                                           tokenize=True, return_dict=True, return_tensors="pt")

``generation_config`` is clean (greedy, no repetition penalty) with ``eos_token_id`` ``</s>``.
Stops (``eos_mode``) as in :mod:`ragws.testing.got_tiny`: ``"mixed"`` (the default) gives
``</s>`` the scaled row of a stand-in token so that, on
:func:`~ragws.testing.got_tiny.synthetic_images` with the "OCR:" prompt, some greedy answers stop
early and some run on; ``"never"`` zeroes the stop row; ``"natural"`` leaves it random.

Command line::

    python -m ragws.testing.paddleocr_vl_tiny OUT_DIR
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

import torch
from PIL import Image

from ragws.testing.got_tiny import build_bpe_tokenizer, randomize, synthetic_images
from ragws.testing.qwen2_vl_tiny import calibrate_mixed_stops

__all__ = [
    "ARCHITECTURE",
    "BUILD_INFO_FILE",
    "MAX_PIXELS",
    "MIN_PIXELS",
    "PADDLEOCR_VL_CHAT_TEMPLATE",
    "PADDLEOCR_VL_SPECIAL_TOKENS",
    "build_paddleocr_vl_tokenizer",
    "build_tiny_paddleocr_vl",
    "main",
]

EosMode = Literal["mixed", "never", "natural"]

#: The architecture ``config.json`` names.
ARCHITECTURE = "PaddleOCRVLForConditionalGeneration"

#: PaddleOCR-VL's special tokens, in the order of their real ids (``<unk>`` 0, ``<s>`` 1,
#: ``</s>`` 2, then the ERNIE and image markers).
PADDLEOCR_VL_SPECIAL_TOKENS: tuple[str, ...] = (
    "<unk>",
    "<s>",
    "</s>",
    "<|begin_of_sentence|>",
    "<|end_of_sentence|>",
    "<|IMAGE_START|>",
    "<|IMAGE_PLACEHOLDER|>",
    "<|IMAGE_END|>",
    "<|video_pad|>",
)

#: PaddleOCR-VL's (v1) chat template: ``<|begin_of_sentence|>User: `` + the message's images
#: (``<|IMAGE_START|><|IMAGE_PLACEHOLDER|><|IMAGE_END|>`` each; the processor expands the
#: placeholder to one token per merged 2 × 2 patch), then its texts, + newline; the generation
#: prompt ``Assistant: ``. The image markers are written out: the v1 template writes them only
#: when no ``image_token`` variable is defined, and ``apply_chat_template`` defines one from a
#: tokenizer that names its image token.
PADDLEOCR_VL_CHAT_TEMPLATE = r"""{%- if not add_generation_prompt is defined -%}{%- set add_generation_prompt = true -%}{%- endif -%}
{%- if not cls_token is defined -%}{%- set cls_token = "<|begin_of_sentence|>" -%}{%- endif -%}
{%- if not eos_token is defined -%}{%- set eos_token = "</s>" -%}{%- endif -%}
{{- cls_token -}}
{%- for message in messages -%}
  {%- if message["role"] == "user" -%}{{- "User: " -}}
    {%- for content in message["content"] -%}{%- if content["type"] == "image" -%}{{ "<|IMAGE_START|><|IMAGE_PLACEHOLDER|><|IMAGE_END|>" }}{%- endif -%}{%- endfor -%}
    {%- for content in message["content"] -%}{%- if content["type"] == "text" -%}{{ content["text"] }}{%- endif -%}{%- endfor -%}
    {{ "\n" -}}
  {%- elif message["role"] == "assistant" -%}{{- "Assistant: " -}}
    {%- for content in message["content"] -%}{%- if content["type"] == "text" -%}{{ content["text"] }}{%- endif -%}{%- endfor -%}
    {{ eos_token -}}
  {%- elif message["role"] == "system" -%}
    {%- for content in message["content"] -%}{%- if content["type"] == "text" -%}{{ content["text"] + "\n" }}{%- endif -%}{%- endfor -%}
  {%- endif -%}
{%- endfor -%}
{%- if add_generation_prompt -%}{{- "Assistant: " -}}{%- endif -%}
"""  # noqa: E501

#: The image processor's pixel bounds: 4 to 36 image tokens (28 × 28 pixels each), so the
#: synthetic images (96–240 px a side) give 18 to 30 tokens, depending on their size.
MIN_PIXELS = 4 * 28 * 28
MAX_PIXELS = 36 * 28 * 28

#: The real tokenizer's ``model_max_length``.
MODEL_MAX_LENGTH = 131072

#: The instruction of the stop calibration: PaddleOCR-VL's text prompt.
CALIBRATION_PROMPT = "OCR:"
REGULAR_VOCAB = 1024
CALIBRATION_IMAGES = 6
CALIBRATION_STEPS = 12
BUILD_INFO_FILE = "ragws_paddleocr_vl_build.json"

_TEXT_CONFIG: dict[str, Any] = {
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,  # GQA, as the real model (16 / 2)
    # Explicit, as the real model's (128, not 1024 / 16); 16 here, not 64 / 4.
    "head_dim": 16,
    "hidden_act": "silu",
    "max_position_embeddings": 4096,
    "rms_norm_eps": 1e-5,
    "use_bias": False,
    # The three M-RoPE sections split head_dim's 8 frequencies (the default [16, 24, 24] is
    # the real model's 64).
    "rope_parameters": {"rope_type": "default", "rope_theta": 500000.0, "mrope_section": [2, 3, 3]},
    "tie_word_embeddings": True,
}

_VISION_CONFIG: dict[str, Any] = {
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_hidden_layers": 2,
    "num_attention_heads": 2,
    "num_channels": 3,
    # A 4 × 4 learned position table, bilinearly resampled to each image's patch grid.
    "image_size": 56,
    "patch_size": 14,
    "spatial_merge_size": 2,
    "hidden_act": "gelu_pytorch_tanh",
    "layer_norm_eps": 1e-6,
}


def build_paddleocr_vl_tokenizer(regular_vocab: int = REGULAR_VOCAB) -> Any:
    """A byte-level BPE tokenizer with PaddleOCR-VL's named tokens: ``regular_vocab`` regular
    tokens, then :data:`PADDLEOCR_VL_SPECIAL_TOKENS`; bos ``<s>``, eos ``</s>``, unk and pad
    ``<unk>``, cls ``<|begin_of_sentence|>``, sep ``<|end_of_sentence|>`` and the
    ``image_token`` ``<|IMAGE_PLACEHOLDER|>`` (``PaddleOCRVLProcessor`` reads
    ``tokenizer.image_token`` and ``tokenizer.image_token_id``)."""
    from transformers import PreTrainedTokenizerFast

    trained = build_bpe_tokenizer(
        regular_vocab,
        PADDLEOCR_VL_SPECIAL_TOKENS,
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<unk>",
        model_max_length=MODEL_MAX_LENGTH,
    )
    # The same vocabulary and added tokens, wrapped again with the named tokens Paddle's
    # tokenizer has beyond bos/eos/pad; the dict form of extra_special_tokens names
    # image_token (an attribute that save_pretrained keeps).
    return PreTrainedTokenizerFast(
        tokenizer_object=trained.backend_tokenizer,
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
        pad_token="<unk>",
        cls_token="<|begin_of_sentence|>",
        sep_token="<|end_of_sentence|>",
        extra_special_tokens={"image_token": "<|IMAGE_PLACEHOLDER|>"},
        model_max_length=MODEL_MAX_LENGTH,
        clean_up_tokenization_spaces=False,
        model_input_names=["input_ids", "attention_mask"],
    )


#: ``size="mid"``: what the benchmarks run on a CPU (a 512-wide, 8-layer decoder, as GOT-OCR2's
#: mid build; a 4-layer vision tower; up to 256 image tokens); ``tiny`` is the tests'.
_MID_TEXT: dict[str, Any] = {
    "hidden_size": 512,
    "intermediate_size": 1408,
    "num_hidden_layers": 8,
    "num_attention_heads": 8,
    "num_key_value_heads": 2,
    "head_dim": 64,
    "rope_parameters": {
        "rope_type": "default",
        "rope_theta": 500000.0,
        "mrope_section": [8, 12, 12],
    },
}
_MID_VISION: dict[str, Any] = {
    "hidden_size": 256,
    "intermediate_size": 512,
    "num_hidden_layers": 4,
    "num_attention_heads": 4,
    "image_size": 224,
}
_MID_PIXELS = (64 * 28 * 28, 256 * 28 * 28)
SIZES = ("tiny", "mid")


def _processor(tokenizer: Any, size: str = "tiny") -> Any:
    from transformers import PaddleOCRVLImageProcessor, PaddleOCRVLProcessor

    low, high = _MID_PIXELS if size == "mid" else (MIN_PIXELS, MAX_PIXELS)
    image_processor = PaddleOCRVLImageProcessor(
        min_pixels=low,
        max_pixels=high,
        image_mean=[0.5, 0.5, 0.5],
        image_std=[0.5, 0.5, 0.5],
    )
    return PaddleOCRVLProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        chat_template=PADDLEOCR_VL_CHAT_TEMPLATE,
    )


def _config(tokenizer: Any, size: str = "tiny") -> Any:
    from transformers import PaddleOCRVLConfig

    def token(name: str) -> int:
        return tokenizer.convert_tokens_to_ids(name)

    text = {
        **_TEXT_CONFIG,
        **(_MID_TEXT if size == "mid" else {}),
        "vocab_size": len(tokenizer),
        "pad_token_id": token("<unk>"),
        "bos_token_id": token("<s>"),
        "eos_token_id": token("</s>"),
    }
    config = PaddleOCRVLConfig(
        text_config=text,
        vision_config={**_VISION_CONFIG, **(_MID_VISION if size == "mid" else {})},
        image_token_id=token("<|IMAGE_PLACEHOLDER|>"),
        video_token_id=token("<|video_pad|>"),
        vision_start_token_id=token("<|IMAGE_START|>"),
        vision_end_token_id=token("<|IMAGE_END|>"),
    )
    config.architectures = [ARCHITECTURE]
    return config


def _chat_inputs(processor: Any, image: Image.Image, instruction: str) -> Any:
    """PaddleOCR-VL's request for one image: no system turn, the image, then the text."""
    messages = [
        {
            "role": "user",
            "content": [{"type": "image", "image": image}, {"type": "text", "text": instruction}],
        }
    ]
    return processor.apply_chat_template(
        messages, add_generation_prompt=True, tokenize=True, return_dict=True, return_tensors="pt"
    )


@torch.no_grad()
def build_tiny_paddleocr_vl(
    out_dir: Path | str, *, seed: int = 0, eos_mode: EosMode = "mixed", size: str = "tiny"
) -> Path:
    """Build a tiny (or, ``size="mid"``, a benchmark-sized) random-weight PaddleOCR-VL and
    ``save_pretrained`` model, generation config and processor (tokenizer, image processor, chat
    template) into ``out_dir``, with ``ragws_paddleocr_vl_build.json`` describing the build.
    Returns ``out_dir``. Takes a few seconds on a CPU."""
    import transformers

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    tokenizer = build_paddleocr_vl_tokenizer()
    if size not in SIZES:
        raise ValueError(f"size must be one of {SIZES}, got {size!r}")
    processor = _processor(tokenizer, size)
    config = _config(tokenizer, size)
    torch.manual_seed(seed)
    model = transformers.PaddleOCRVLForConditionalGeneration(config).eval()
    randomize(model, seed, projector=".projector.linear_2")
    with torch.no_grad():
        # HF's init leaves the learned position table near zero; give it weight, as
        # randomize does GOT's, so that where a patch sits changes its features.
        table = model.model.visual.vision_model.embeddings.position_embedding.weight
        generator = torch.Generator().manual_seed(seed + 1)
        table.copy_(0.5 * torch.randn(table.shape, generator=generator))

    pad, bos, eos = (tokenizer.convert_tokens_to_ids(t) for t in ("<unk>", "<s>", "</s>"))
    model.generation_config = transformers.GenerationConfig(
        bos_token_id=bos, eos_token_id=eos, pad_token_id=pad
    )
    info: dict[str, Any] = {
        "arch": ARCHITECTURE,
        "seed": seed,
        "eos_mode": eos_mode,
        "stop_token_ids": [eos],
        "pixels": [MIN_PIXELS, MAX_PIXELS],
    }
    with torch.no_grad():
        emb = model.get_input_embeddings().weight
        # Tokens the model never emits get zero rows (logit 0: never the argmax); the prompt's
        # own markers keep a shrunk row (their input embedding matters).
        in_prompt = ["<|begin_of_sentence|>", "<|IMAGE_START|>", "<|IMAGE_END|>"]
        never = [t for t in PADDLEOCR_VL_SPECIAL_TOKENS if t not in (*in_prompt, "</s>")]
        emb[tokenizer.convert_tokens_to_ids(never)] = 0.0
        emb[tokenizer.convert_tokens_to_ids(in_prompt)] *= 0.25
        if eos_mode == "never":
            emb[eos].zero_()
        elif eos_mode == "mixed":
            images = synthetic_images(CALIBRATION_IMAGES, seed=seed)
            inputs = [_chat_inputs(processor, image, CALIBRATION_PROMPT) for image in images]
            standin, answers = calibrate_mixed_stops(model, inputs, eos, "</s>", CALIBRATION_STEPS)
            info["standin_token_id"] = standin
            info["calibration"] = {
                "images": f"synthetic_images({CALIBRATION_IMAGES}, seed={seed})",
                "prompt": CALIBRATION_PROMPT,
                "max_new_tokens": CALIBRATION_STEPS,
                "greedy_ids": answers,
            }
    model.save_pretrained(out_dir)
    processor.save_pretrained(out_dir)
    (out_dir / BUILD_INFO_FILE).write_text(json.dumps(info, indent=1) + "\n", encoding="utf-8")
    return out_dir


def main(argv: Sequence[str] | None = None) -> None:
    """``python -m ragws.testing.paddleocr_vl_tiny OUT_DIR [--seed N] [--eos-mode MODE]``."""
    parser = argparse.ArgumentParser(description="Build a tiny random-weight PaddleOCR-VL.")
    parser.add_argument("out_dir", type=Path)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--eos-mode", choices=["mixed", "never", "natural"], default="mixed")
    args = parser.parse_args(argv)
    print(build_tiny_paddleocr_vl(args.out_dir, seed=args.seed, eos_mode=args.eos_mode))


if __name__ == "__main__":
    main()
