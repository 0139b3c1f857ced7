"""Random-weight Qwen2-VL and Qwen2.5-VL checkpoints of the real architectures, built offline.

The stand-ins of MinerU2.5 (``Qwen2VLForConditionalGeneration``) and of olmOCR-2, Nanonets-OCR2
and RolmOCR (``Qwen2_5_VLForConditionalGeneration``) for tests and benchmarks: the real model
classes at tiny sizes (Qwen2 decoder with M-RoPE, 64 hidden × 2 layers; a 2-block NaViT vision
tower, Qwen2.5's with windowed attention in block 0 and full attention in block 1), random
weights, a byte-level BPE tokenizer with Qwen's special tokens in their real order, the real
processor classes (image processor with small pixel bounds, so that images of different sizes
give different numbers of image tokens; the video processor the processors require) and the
Qwen2-VL-Instruct chat template, all written with ``save_pretrained``. The result loads with the
real-checkpoint calls::

    model = Qwen2VLForConditionalGeneration.from_pretrained(out_dir)
    processor = AutoProcessor.from_pretrained(out_dir)
    inputs = processor.apply_chat_template(messages, add_generation_prompt=True,
                                           tokenize=True, return_dict=True, return_tensors="pt")

``generation_config`` is clean (greedy, no repetition penalty) with ``eos_token_id``
``[<|im_end|>, <|endoftext|>]``. Stops (``eos_mode``) as in :mod:`ragws.testing.got_tiny`:
``"mixed"`` (the default) gives ``<|im_end|>`` the scaled row of a stand-in token so that, on
:func:`~ragws.testing.got_tiny.synthetic_images` with MinerU's text prompt, some greedy answers
stop early and some run on; ``"never"`` zeroes the stop rows; ``"natural"`` leaves them random.

Command line::

    python -m ragws.testing.qwen2_vl_tiny OUT_DIR [--arch qwen2_vl|qwen2_5_vl]
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

__all__ = [
    "ARCHITECTURES",
    "BUILD_INFO_FILE",
    "MAX_PIXELS",
    "MIN_PIXELS",
    "QWEN2_VL_CHAT_TEMPLATE",
    "QWEN_VL_SPECIAL_TOKENS",
    "build_qwen_vl_tokenizer",
    "build_tiny_qwen2_vl",
    "main",
]

EosMode = Literal["mixed", "never", "natural"]

#: The tiny builds: short name → the architecture ``config.json`` names.
ARCHITECTURES = {
    "qwen2_vl": "Qwen2VLForConditionalGeneration",
    "qwen2_5_vl": "Qwen2_5_VLForConditionalGeneration",
}

#: Qwen2-VL's special tokens in their real order (the real ids are 151643 + index).
QWEN_VL_SPECIAL_TOKENS: tuple[str, ...] = (
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|object_ref_start|>",
    "<|object_ref_end|>",
    "<|box_start|>",
    "<|box_end|>",
    "<|quad_start|>",
    "<|quad_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|vision_pad|>",
    "<|image_pad|>",
    "<|video_pad|>",
)

#: Qwen2-VL-Instruct's (and Qwen2.5-VL-Instruct's) chat template, verbatim: it adds the default
#: system turn when there is none and keeps the order of a message's images and texts.
QWEN2_VL_CHAT_TEMPLATE = (
    "{% set image_count = namespace(value=0) %}{% set video_count = namespace(value=0) %}"
    "{% for message in messages %}{% if loop.first and message['role'] != 'system' %}"
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}"
    "<|im_start|>{{ message['role'] }}\n{% if message['content'] is string %}"
    "{{ message['content'] }}<|im_end|>\n{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' or 'image' in content or 'image_url' in content %}"
    "{% set image_count.value = image_count.value + 1 %}{% if add_vision_id %}"
    "Picture {{ image_count.value }}: {% endif %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif content['type'] == 'video' or 'video' in content %}"
    "{% set video_count.value = video_count.value + 1 %}{% if add_vision_id %}"
    "Video {{ video_count.value }}: {% endif %}<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif 'text' in content %}{{ content['text'] }}{% endif %}{% endfor %}<|im_end|>\n"
    "{% endif %}{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

#: The image processor's pixel bounds: 4 to 36 image tokens (28 × 28 pixels each), so the
#: synthetic images (96–240 px a side) give 18 to 30 tokens, depending on their size.
MIN_PIXELS = 4 * 28 * 28
MAX_PIXELS = 36 * 28 * 28

#: The real tokenizers' ``model_max_length``.
MODEL_MAX_LENGTH = 32768

REGULAR_VOCAB = 1024
CALIBRATION_IMAGES = 6
CALIBRATION_STEPS = 12
BUILD_INFO_FILE = "ragws_qwen_vl_build.json"

_TEXT_CONFIG: dict[str, Any] = {
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,  # GQA, as the real models
    "hidden_act": "silu",
    "max_position_embeddings": 4096,
    "rms_norm_eps": 1e-6,
    # head_dim 16: the three M-RoPE sections split its 8 frequencies.
    "rope_parameters": {"rope_type": "default", "rope_theta": 1e6, "mrope_section": [2, 3, 3]},
    "use_sliding_window": False,
    "tie_word_embeddings": True,
}

_VISION_CONFIGS: dict[str, dict[str, Any]] = {
    "qwen2_vl": {
        "depth": 2,
        "embed_dim": 32,
        "hidden_size": 64,  # the merger's output: the decoder's width
        "num_heads": 2,
        "mlp_ratio": 2,
        "patch_size": 14,
        "spatial_merge_size": 2,
        "temporal_patch_size": 2,
        "in_channels": 3,
        "hidden_act": "quick_gelu",
    },
    "qwen2_5_vl": {
        "depth": 2,
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_heads": 2,
        "out_hidden_size": 64,
        "patch_size": 14,
        "spatial_merge_size": 2,
        "temporal_patch_size": 2,
        "in_channels": 3,
        "hidden_act": "silu",
        # Windows of 2 × 2 merged tokens in block 0 (every synthetic image has several,
        # some partial), the whole image in block 1.
        "window_size": 56,
        "fullatt_block_indexes": [1],
        "tokens_per_second": 2,
    },
}


#: ``size="mid"``: what the benchmarks run on a CPU (a 512-wide, 8-layer decoder, as GOT-OCR2's
#: mid build; a 4-block vision tower; up to 256 image tokens); ``tiny`` is the tests'.
_MID_TEXT: dict[str, Any] = {
    "hidden_size": 512,
    "intermediate_size": 1408,
    "num_hidden_layers": 8,
    "num_attention_heads": 8,
    "num_key_value_heads": 4,
    "rope_parameters": {"rope_type": "default", "rope_theta": 1e6, "mrope_section": [8, 12, 12]},
}
_MID_VISION: dict[str, dict[str, Any]] = {
    "qwen2_vl": {"depth": 4, "embed_dim": 256, "hidden_size": 512, "num_heads": 4},
    "qwen2_5_vl": {
        "depth": 4,
        "hidden_size": 256,
        "intermediate_size": 512,
        "num_heads": 4,
        "out_hidden_size": 512,
        "window_size": 112,
        "fullatt_block_indexes": [3],
    },
}
_MID_PIXELS = (64 * 28 * 28, 256 * 28 * 28)
SIZES = ("tiny", "mid")


def build_qwen_vl_tokenizer(regular_vocab: int = REGULAR_VOCAB) -> Any:
    """A byte-level BPE tokenizer laid out like Qwen2-VL's: ``regular_vocab`` regular tokens,
    then :data:`QWEN_VL_SPECIAL_TOKENS`; eos ``<|im_end|>``, pad ``<|endoftext|>``, no bos."""
    return build_bpe_tokenizer(
        regular_vocab,
        QWEN_VL_SPECIAL_TOKENS,
        bos_token=None,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        model_max_length=MODEL_MAX_LENGTH,
    )


def _processor(arch: str, tokenizer: Any, size: str = "tiny") -> Any:
    from transformers import (
        Qwen2_5_VLProcessor,
        Qwen2VLImageProcessor,
        Qwen2VLProcessor,
        Qwen2VLVideoProcessor,
    )

    processor_class = Qwen2VLProcessor if arch == "qwen2_vl" else Qwen2_5_VLProcessor
    low, high = _MID_PIXELS if size == "mid" else (MIN_PIXELS, MAX_PIXELS)
    return processor_class(
        image_processor=Qwen2VLImageProcessor(min_pixels=low, max_pixels=high),
        tokenizer=tokenizer,
        # Required by the processors, though OCR sends no video.
        video_processor=Qwen2VLVideoProcessor(),
        chat_template=QWEN2_VL_CHAT_TEMPLATE,
    )


def _config(arch: str, tokenizer: Any, size: str = "tiny") -> Any:
    from transformers import Qwen2_5_VLConfig, Qwen2VLConfig

    def token(name: str) -> int:
        return tokenizer.convert_tokens_to_ids(name)

    eot = token("<|endoftext|>")
    text = {
        **_TEXT_CONFIG,
        **(_MID_TEXT if size == "mid" else {}),
        "vocab_size": len(tokenizer),
        "bos_token_id": eot,
        "eos_token_id": token("<|im_end|>"),
        "pad_token_id": eot,
    }
    config_class = Qwen2VLConfig if arch == "qwen2_vl" else Qwen2_5_VLConfig
    config = config_class(
        text_config=text,
        vision_config={**_VISION_CONFIGS[arch], **(_MID_VISION[arch] if size == "mid" else {})},
        image_token_id=token("<|image_pad|>"),
        video_token_id=token("<|video_pad|>"),
        vision_start_token_id=token("<|vision_start|>"),
        vision_end_token_id=token("<|vision_end|>"),
        tie_word_embeddings=True,
    )
    config.architectures = [ARCHITECTURES[arch]]
    return config


def _chat_inputs(processor: Any, image: Image.Image, instruction: str) -> Any:
    """MinerU's request for one image: default system turn, the image, then the text."""
    messages = [
        {"role": "system", "content": "You are a helpful assistant."},
        {
            "role": "user",
            "content": [{"type": "image", "image": image}, {"type": "text", "text": instruction}],
        },
    ]
    return processor.apply_chat_template(
        messages, add_generation_prompt=True, tokenize=True, return_dict=True, return_tensors="pt"
    )


def greedy(model: Any, inputs: list[Any], steps: int) -> list[list[int]]:
    """Greedy continuations (no stop) of prompts, each run alone."""
    outputs = []
    for one in inputs:
        out = model.generate(
            **one,
            do_sample=False,
            max_new_tokens=steps,
            min_new_tokens=steps,
            eos_token_id=None,
            pad_token_id=model.generation_config.pad_token_id,
        )
        outputs.append(out[0, one["input_ids"].shape[1] :].tolist())
    return outputs


@torch.no_grad()
def calibrate_mixed_stops(
    model: Any,
    inputs: list[Any],
    stop_id: int,
    stop_name: str,
    steps: int = CALIBRATION_STEPS,
) -> tuple[int, list[list[int]]]:
    """Give the stop token (``stop_name``, id ``stop_id``) 1.25 × the embedding row of a
    stand-in token X, X chosen so that, on ``inputs`` (the processor's chat inputs), some
    greedy answers stop early (after their first token) and some run to the end; return X and
    the answers (cut after their stop)."""
    emb = model.get_input_embeddings().weight
    emb[stop_id].zero_()
    base = greedy(model, inputs, steps)
    seen: dict[int, int] = {}  # token → answers that produce it after their first token
    for answer in base:
        for token in set(answer[1:]):
            seen[token] = seen.get(token, 0) + 1
    target = len(inputs) / 2
    for token in sorted(seen, key=lambda t: (abs(seen[t] - target), t))[:12]:
        emb[stop_id] = 1.25 * emb[token]
        answers = greedy(model, inputs, steps)
        stops = [next((i for i, t in enumerate(a) if t == stop_id), None) for a in answers]
        early = sum(1 for i in stops if i is not None and i >= 1)
        full = sum(1 for i in stops if i is None)
        if early >= 2 and full >= 2 and early + full == len(answers):
            cut = [a if i is None else a[: i + 1] for a, i in zip(answers, stops, strict=True)]
            return token, cut
    raise RuntimeError(
        f"no stand-in token for {stop_name} gives a mix of stopping answers; try another seed"
    )


def build_tiny_qwen2_vl(
    out_dir: Path | str,
    arch: str = "qwen2_vl",
    *,
    seed: int = 0,
    eos_mode: EosMode = "mixed",
    size: str = "tiny",
) -> Path:
    """Build a tiny (or, ``size="mid"``, a benchmark-sized) random-weight ``arch`` (a key of
    :data:`ARCHITECTURES`) and ``save_pretrained`` model, generation config and processor
    (tokenizer, image and video processors, chat template) into ``out_dir``, with
    ``ragws_qwen_vl_build.json`` describing the build. Returns ``out_dir``. Takes a few seconds on
    a CPU."""
    import transformers

    if arch not in ARCHITECTURES:
        raise ValueError(f"arch must be one of {sorted(ARCHITECTURES)}, got {arch!r}")
    if size not in SIZES:
        raise ValueError(f"size must be one of {SIZES}, got {size!r}")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    tokenizer = build_qwen_vl_tokenizer()
    processor = _processor(arch, tokenizer, size)
    config = _config(arch, tokenizer, size)
    torch.manual_seed(seed)
    model = getattr(transformers, ARCHITECTURES[arch])(config).eval()
    randomize(model, seed, projector=".merger.mlp.2")

    eot = tokenizer.convert_tokens_to_ids("<|endoftext|>")
    im_end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    model.generation_config = transformers.GenerationConfig(
        bos_token_id=eot, eos_token_id=[im_end, eot], pad_token_id=eot
    )
    info: dict[str, Any] = {
        "arch": arch,
        "size": size,
        "seed": seed,
        "eos_mode": eos_mode,
        "stop_token_ids": [im_end, eot],
        "pixels": [MIN_PIXELS, MAX_PIXELS],
    }
    with torch.no_grad():
        emb = model.get_input_embeddings().weight
        # Tokens the model never emits get zero rows (logit 0: never the argmax); the prompt's
        # own markers keep a shrunk row (their input embedding matters).
        in_prompt = ["<|im_start|>", "<|vision_start|>", "<|vision_end|>"]
        never = [
            t
            for t in QWEN_VL_SPECIAL_TOKENS
            if t not in (*in_prompt, "<|im_end|>", "<|endoftext|>")
        ]
        emb[tokenizer.convert_tokens_to_ids(never)] = 0.0
        emb[tokenizer.convert_tokens_to_ids(in_prompt)] *= 0.25
        if eos_mode in ("mixed", "never"):
            emb[eot].zero_()
        if eos_mode == "never":
            emb[im_end].zero_()
        elif eos_mode == "mixed":
            images = synthetic_images(CALIBRATION_IMAGES, seed=seed)
            inputs = [_chat_inputs(processor, image, "\nText Recognition:") for image in images]
            standin, answers = calibrate_mixed_stops(model, inputs, im_end, "<|im_end|>")
            info["standin_token_id"] = standin
            info["calibration"] = {
                "images": f"synthetic_images({CALIBRATION_IMAGES}, seed={seed})",
                "prompt": "\nText Recognition:",
                "max_new_tokens": CALIBRATION_STEPS,
                "greedy_ids": answers,
            }
    model.save_pretrained(out_dir)
    processor.save_pretrained(out_dir)
    (out_dir / BUILD_INFO_FILE).write_text(json.dumps(info, indent=1) + "\n", encoding="utf-8")
    return out_dir


def main(argv: Sequence[str] | None = None) -> None:
    """``python -m ragws.testing.qwen2_vl_tiny OUT_DIR [--arch ARCH] [--seed N]``."""
    parser = argparse.ArgumentParser(description="Build a tiny random-weight Qwen2-VL checkpoint.")
    parser.add_argument("out_dir", type=Path)
    parser.add_argument("--arch", choices=sorted(ARCHITECTURES), default="qwen2_vl")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--eos-mode", choices=["mixed", "never", "natural"], default="mixed")
    args = parser.parse_args(argv)
    print(build_tiny_qwen2_vl(args.out_dir, args.arch, seed=args.seed, eos_mode=args.eos_mode))


if __name__ == "__main__":
    main()
