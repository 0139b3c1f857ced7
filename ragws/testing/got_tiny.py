"""Random-weight GOT-OCR2 checkpoints of the real architecture, built offline.

The Hugging Face hub is out of reach in CI, so tests of the OCR engine cannot download
``stepfun-ai/GOT-OCR-2.0-hf``.  This module builds a stand-in of the same architecture
(SAM-style ViT encoder → neck → two stride-2 convolutions + linear projector → Qwen2 decoder)
with random weights, a freshly trained byte-level BPE tokenizer carrying GOT's special tokens,
and the real processor classes, and saves everything with ``save_pretrained``.  The result
loads with the real-checkpoint calls::

    model = GotOcr2ForConditionalGeneration.from_pretrained(out_dir)
    processor = AutoProcessor.from_pretrained(out_dir)
    inputs = processor(image, return_tensors="pt")          # "OCR: " prompt
    inputs = processor(image, return_tensors="pt", format=True)  # "OCR with format: "

Sizes (:data:`SIZES`): ``"tiny"`` for unit tests (0.37 M parameters, 1.5 MB, built in ~1 s),
``"mid"`` (Qwen2 512 × 8 layers, 32k vocab, a small windowed-attention vision tower at the
real 1024 px input: about 0.1 s per image on a 2-core CPU, so that decoding dominates, as on a
GPU with the real model) and ``"real"`` (the real GOT-OCR2 shapes, about
560 M parameters) for benchmarks.  Every size produces 256 image tokens per image, the
processor's fixed default, so prompts need no ``num_image_tokens=`` override.

Stop behaviour (``eos_mode``): the real model ends an answer with ``<|im_end|>``.  A random
model almost never does, so the builder controls it through the weights only:

* ``"mixed"`` (default for ``"tiny"``): ``<|im_end|>``'s row of the (tied) embedding/LM-head
  matrix is set to ``1.25 ×`` the row of a *stand-in* token X, so greedy decoding emits
  ``<|im_end|>`` exactly where it would have emitted X (X's logit is then the largest and
  positive).  X is searched at build time so that, on :func:`synthetic_images` with the
  plain "OCR: " prompt and :data:`CALIBRATION_STEPS` new tokens, some sequences stop early
  (after at least one token) and some run to the limit.  The outcome is recorded in
  ``ragws_got_build.json`` in the output folder (golden greedy outputs for decode tests).
* ``"never"`` (default for ``"mid"``/``"real"``): the rows of ``<|im_end|>`` and
  ``<|endoftext|>`` are zero, so their logit is 0 while the best other logit is positive:
  every sequence runs to ``max_new_tokens`` (predictable benchmark lengths).
* ``"natural"``: ``<|im_end|>`` and ``<|endoftext|>`` keep random rows (stops are rare and
  unpredictable).

In every mode the rows of tokens the real model never emits (the ``<|extra_N|>``,
``<ref>``/``<box>``/``<quad>`` tokens and ``<imgpad>``, whose input embedding is always
replaced by image features) are zero, and those of the prompt-only ``<|im_start|>``,
``<img>`` and ``</img>`` are shrunk, so outputs are mostly regular tokens (including single
bytes of multi-byte characters, i.e. invalid UTF-8 on their own).

In every mode ``generation_config.eos_token_id`` is ``[<|im_end|>, <|endoftext|>]`` so that
``model.generate`` stops on ``<|im_end|>`` without ``stop_strings``.

Command line (e.g. on a GPU machine, for benchmarks)::

    python -m ragws.testing.got_tiny OUT_DIR --size mid
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import random
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

import torch
from PIL import Image, ImageDraw
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers
from torch import nn

__all__ = [
    "CALIBRATION_STEPS",
    "GOT_SPECIAL_TOKENS",
    "SIZES",
    "GotSize",
    "build_bpe_tokenizer",
    "build_got_ocr2",
    "build_got_tokenizer",
    "build_tiny_got_ocr2",
    "image_tokens_for",
    "main",
    "synthetic_images",
]

EosMode = Literal["mixed", "never", "natural"]

#: GOT's special tokens in id order, appended after the regular byte-level BPE vocabulary,
#: exactly as ``convert_got_ocr2_weights_to_hf.write_tokenizer`` lays them out (with the
#: real 151 643 regular tokens: ``<|endoftext|>`` = 151643, ``<|im_start|>`` = 151644,
#: ``<|im_end|>`` = 151645, ``<imgpad>`` = 151859 = ``GotOcr2Config.image_token_index``).
GOT_SPECIAL_TOKENS: tuple[str, ...] = (
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    *(f"<|extra_{i}|>" for i in range(205)),
    "<ref>",
    "</ref>",
    "<box>",
    "</box>",
    "<quad>",
    "</quad>",
    "<img>",
    "</img>",
    "<imgpad>",
)

#: Qwen's pre-tokenisation regex (from the conversion script).
QWEN_SPLIT_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}|"
    r" ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)

#: The real tokenizer's ``model_max_length`` (``CONTEXT_LENGTH`` in the conversion script).
MODEL_MAX_LENGTH = 8000

#: New tokens per sequence in the ``"mixed"`` stop calibration.
CALIBRATION_STEPS = 20

#: Number of :func:`synthetic_images` used by the ``"mixed"`` stop calibration.
CALIBRATION_IMAGES = 8

BUILD_INFO_FILE = "ragws_got_build.json"

# A small corpus for the BPE merges: prose, digits, LaTeX/markdown markup, accents, CJK.
_CORPUS_LINES: tuple[str, ...] = (
    "system\nYou should follow the instructions carefully and explain your answers in detail.",
    "user\n OCR: OCR with format: OCR across multi pages: OCR upon the patch reference:",
    "assistant\n [red] [green] [blue] [0, 0, 1000, 1000] OCR: ",
    "The quick brown fox jumps over the lazy dog.",
    "Optical character recognition turns pages into text for retrieval pipelines.",
    "Table 3 reports the results on 1,024 documents; see Section 4.2 for details.",
    "Figure 1: Overview of the model. The encoder compresses 1024x1024 images.",
    "In 2023, revenue grew by 12.5% to $4,210 million (up from $3,742 million).",
    "0 1 2 3 4 5 6 7 8 9 10 11 12 100 256 512 1000 2048 3.14159 2.71828",
    r"\section{Introduction} \subsection{Related work} \begin{itemize} \item one \end{itemize}",
    r"$E = mc^2$, $\frac{a}{b}$, $\sum_{i=1}^{n} x_i^2$, $\int_0^1 f(x)\,dx$, $\alpha + \beta$",
    r"\begin{tabular}{|c|c|} \hline a & b \\ \hline 1 & 2 \\ \hline \end{tabular}",
    "| Name | Value |\n|------|-------|\n| alpha | 0.5 |\n| beta | 1.5 |",
    "# Heading\n\n**bold** and *italic* text, `code`, [link](http://example.com)",
    "café, naïve, résumé, élève, façade, Straße, smörgåsbord, jalapeño, Ångström",
    "Le modèle reconnaît les caractères accentués: à â é è ê ë î ï ô ù û ü ç œ.",
    "中文文字识别模型可以读取文档中的表格和公式。",
    "光学字符识别 通用 文档 表格 公式 图片 文本",
    "日本語のテキストも少し含めます。",
    "Mixed: naïve 中文 text, 12 items, ∑ ≤ ≥ ± × ÷ → ∞ °C",
)


@dataclasses.dataclass(frozen=True)
class GotSize:
    """Architecture knobs for one build size (see :data:`SIZES`)."""

    regular_vocab: int  # regular (non-special) tokens; the 217 GOT special tokens follow
    text_hidden: int
    text_layers: int
    text_heads: int
    text_kv_heads: int
    text_intermediate: int
    vision_hidden: int
    vision_layers: int
    vision_heads: int
    vision_mlp: int
    vision_out_channels: int
    vision_window: int
    vision_global_layers: tuple[int, ...]
    image_size: int
    patch_size: int
    rope_theta: float = 1_000_000.0
    rms_norm_eps: float = 1e-6
    max_position_embeddings: int = 32768


#: ``"real"`` is ``GotOcr2Config()``'s defaults (what the conversion script saves):
#: Qwen2 1024 hidden × 24 layers, 16 heads / 16 KV heads, 2816 MLP, vocab 151 860, tied
#: embeddings, rope θ 1e6; SAM ViT-B 768 × 12 layers at 1024 px / 16 px patches.
SIZES: dict[str, GotSize] = {
    "tiny": GotSize(
        regular_vocab=1024,
        text_hidden=64,
        text_layers=2,
        text_heads=4,
        text_kv_heads=2,
        text_intermediate=128,
        vision_hidden=32,
        vision_layers=2,
        vision_heads=2,
        vision_mlp=64,
        vision_out_channels=32,
        vision_window=8,
        vision_global_layers=(),
        image_size=128,
        patch_size=2,
    ),
    "mid": GotSize(
        regular_vocab=32000,
        text_hidden=512,
        text_layers=8,
        text_heads=8,
        text_kv_heads=4,
        text_intermediate=1408,
        vision_hidden=64,
        vision_layers=2,
        vision_heads=2,
        vision_mlp=256,
        vision_out_channels=256,
        vision_window=14,
        vision_global_layers=(),
        image_size=1024,
        patch_size=16,
    ),
    "real": GotSize(
        regular_vocab=151643,
        text_hidden=1024,
        text_layers=24,
        text_heads=16,
        text_kv_heads=16,
        text_intermediate=2816,
        vision_hidden=768,
        vision_layers=12,
        vision_heads=12,
        vision_mlp=3072,
        vision_out_channels=256,
        vision_window=14,
        vision_global_layers=(2, 5, 8, 11),
        image_size=1024,
        patch_size=16,
    ),
}

_DEFAULT_EOS_MODE: dict[str, EosMode] = {"tiny": "mixed", "mid": "never", "real": "never"}


def image_tokens_for(image_size: int, patch_size: int) -> int:
    """Number of image tokens the vision tower + projector emit for one image.

    The ViT works on a ``g × g`` grid with ``g = image_size // patch_size``; the neck keeps
    it; each of the projector's two ``Conv2d(kernel 3, stride 2, padding 1)`` maps ``g`` to
    ``ceil(g / 2)``.  The processor inserts ``num_image_tokens`` (default 256, not
    configurable in a saved processor) ``<imgpad>`` tokens, so a checkpoint usable with the
    default processor call needs ``ceil(ceil(g / 2) / 2) == 16``, i.e. ``61 <= g <= 64``.
    """
    grid = image_size // patch_size
    side = math.ceil(math.ceil(grid / 2) / 2)
    return side * side


def _filler_token(index: int) -> str:
    """A decodable, never-produced regular token (printable ASCII in byte-level form)."""
    letters = "abcdefghijklmnopqrstuvwxyz"
    out = []
    index += 1
    while index:
        index, rem = divmod(index - 1, 26)
        out.append(letters[rem])
    return "Ġ~" + "".join(reversed(out))  # decodes to " ~abc…"


def build_got_tokenizer(regular_vocab: int = 512) -> Any:
    """Train a byte-level BPE tokenizer laid out like GOT's (Qwen) tokenizer.

    ``regular_vocab`` regular tokens are followed by :data:`GOT_SPECIAL_TOKENS` (see
    :func:`build_bpe_tokenizer`), with bos = eos = pad = ``<|endoftext|>`` and
    ``model_max_length`` 8000 like ``convert_got_ocr2_weights_to_hf.write_tokenizer``.
    """
    return build_bpe_tokenizer(
        regular_vocab,
        GOT_SPECIAL_TOKENS,
        bos_token="<|endoftext|>",
        eos_token="<|endoftext|>",
        pad_token="<|endoftext|>",
        model_max_length=MODEL_MAX_LENGTH,
    )


def build_bpe_tokenizer(
    regular_vocab: int,
    special_tokens: Sequence[str],
    *,
    bos_token: str | None,
    eos_token: str,
    pad_token: str,
    model_max_length: int,
) -> Any:
    """Train a byte-level BPE tokenizer laid out like Qwen's, with ``special_tokens`` after
    the regular vocabulary (in their order: the first gets id ``regular_vocab``).

    ``regular_vocab`` regular tokens (the 256 byte symbols, merges learnt from a built-in
    corpus, then filler tokens up to the count) come first. Any Unicode text round-trips
    (byte fallback: unseen characters such as emoji become several byte tokens). Wrapped as
    ``PreTrainedTokenizerFast`` with the named bos/eos/pad tokens (each one of
    ``special_tokens``), the other special tokens as extra special tokens, and
    ``clean_up_tokenization_spaces=False``.
    """
    from transformers import PreTrainedTokenizerFast

    byte_alphabet = pre_tokenizers.ByteLevel.alphabet()
    if regular_vocab < len(byte_alphabet):
        raise ValueError(f"regular_vocab must be at least {len(byte_alphabet)}")

    def pre_tokenizer() -> Any:
        return pre_tokenizers.Sequence(
            [
                pre_tokenizers.Split(Regex(QWEN_SPLIT_PATTERN), behavior="isolated"),
                pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
            ]
        )

    trained = Tokenizer(models.BPE())
    trained.pre_tokenizer = pre_tokenizer()
    trainer = trainers.BpeTrainer(
        vocab_size=min(regular_vocab, 4096),
        min_frequency=2,
        initial_alphabet=byte_alphabet,
        show_progress=False,
    )
    trained.train_from_iterator(list(_CORPUS_LINES) * 4, trainer)
    spec = json.loads(trained.to_str())["model"]
    vocab: dict[str, int] = dict(spec["vocab"])
    merges = [tuple(m) if isinstance(m, list) else tuple(m.split(" ")) for m in spec["merges"]]
    # Keep ids dense and in training order, then pad with fillers up to regular_vocab.
    ordered = sorted(vocab, key=vocab.__getitem__)[:regular_vocab]
    kept = set(ordered)
    merges = [m for m in merges if m[0] in kept and m[1] in kept and m[0] + m[1] in kept]
    filler = 0
    while len(ordered) < regular_vocab:
        token = _filler_token(filler)
        filler += 1
        if token not in kept:
            ordered.append(token)
            kept.add(token)
    vocab = {token: i for i, token in enumerate(ordered)}

    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, fuse_unk=False))
    tok.pre_tokenizer = pre_tokenizer()
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(list(special_tokens))
    assert tok.token_to_id(special_tokens[0]) == regular_vocab
    assert tok.get_vocab_size() == regular_vocab + len(special_tokens)
    named = {bos_token, eos_token, pad_token}

    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=bos_token,
        eos_token=eos_token,
        pad_token=pad_token,
        extra_special_tokens=[t for t in special_tokens if t not in named],
        model_max_length=model_max_length,
        clean_up_tokenization_spaces=False,
        model_input_names=["input_ids", "attention_mask"],
    )


def _make_config(size: GotSize, tokenizer: Any) -> Any:
    from transformers import GotOcr2Config

    vocab_size = len(tokenizer)
    eot = tokenizer.convert_tokens_to_ids("<|endoftext|>")
    text_config = {
        "model_type": "qwen2",
        "vocab_size": vocab_size,
        "hidden_size": size.text_hidden,
        "intermediate_size": size.text_intermediate,
        "num_hidden_layers": size.text_layers,
        "num_attention_heads": size.text_heads,
        "num_key_value_heads": size.text_kv_heads,
        "hidden_act": "silu",
        "max_position_embeddings": size.max_position_embeddings,
        "initializer_range": 0.02,
        "rms_norm_eps": size.rms_norm_eps,
        "use_cache": True,
        "tie_word_embeddings": True,
        "rope_parameters": {"rope_type": "default", "rope_theta": size.rope_theta},
        "use_sliding_window": False,
        "sliding_window": 4096,
        "max_window_layers": size.text_layers,
        "attention_dropout": 0.0,
        "bos_token_id": eot,
        "eos_token_id": eot,
        "pad_token_id": eot,
    }
    vision_config = {
        "hidden_size": size.vision_hidden,
        "output_channels": size.vision_out_channels,
        "num_hidden_layers": size.vision_layers,
        "num_attention_heads": size.vision_heads,
        "num_channels": 3,
        "image_size": size.image_size,
        "patch_size": size.patch_size,
        "hidden_act": "gelu",
        "layer_norm_eps": 1e-6,
        "qkv_bias": True,
        "use_abs_pos": True,
        "use_rel_pos": True,
        "window_size": size.vision_window,
        "global_attn_indexes": list(size.vision_global_layers),
        "mlp_dim": size.vision_mlp,
    }
    config = GotOcr2Config(
        text_config=text_config,
        vision_config=vision_config,
        image_token_index=tokenizer.convert_tokens_to_ids("<imgpad>"),
        image_seq_length=image_tokens_for(size.image_size, size.patch_size),
        tie_word_embeddings=True,
    )
    config.architectures = ["GotOcr2ForConditionalGeneration"]
    return config


#: Extra gains over N(0, 1/fan_in) for the Qwen2 decoder and projector weights.  Found by
#: search on the tiny model: sharper attention (q/k), stronger attention/MLP writes to the
#: residual stream and larger image features make greedy outputs depend on the image from
#: the first token on, instead of every image repeating one token (with tied embeddings and
#: weak layers the residual stream is dominated by the input token's own embedding, whose
#: logit then wins: a model that copies its input forever).
_TEXT_GAINS = {"q_proj": 4.0, "k_proj": 4.0, "v_proj": 3.0, "o_proj": 3.0, "down_proj": 2.0}
_PROJECTOR_GAIN = 2.0


def _gain(module_name: str, projector: str) -> float:
    if ".language_model." in module_name:
        return _TEXT_GAINS.get(module_name.rsplit(".", 1)[-1], 1.0)
    if module_name.endswith(projector):
        return _PROJECTOR_GAIN
    return 1.0


@torch.no_grad()
def randomize(model: nn.Module, seed: int, *, projector: str = ".multimodal_projector") -> None:
    """Re-initialise every weight so activations stay O(1) and outputs depend on the image.

    HF's init gives the vision tower std 1e-10 (a constant image embedding) and zero
    position tables.  Here Linear/Conv weights get N(0, 1/fan_in) (times :data:`_TEXT_GAINS`
    in the decoder and :data:`_PROJECTOR_GAIN` for the projector's linear layer), biases
    N(0, 0.02²), norms 1/0, the absolute and relative position tables N(0, 0.5²)/N(0, 0.1²)
    and the (tied) token embedding N(0, 1), so logits have std ≈ sqrt(hidden) and greedy
    choices are decisive rather than near-ties.  ``projector`` ends the name of the linear
    layer that writes image features into the decoder (GOT's projector's last layer).  Works
    for any VLM of Linear/Conv layers, LayerNorms and RMSNorms (Qwen2-VL's ViTs too).
    """
    from transformers.models.got_ocr2.modeling_got_ocr2 import (
        GotOcr2VisionAttention,
        GotOcr2VisionEncoder,
    )

    gen = torch.Generator().manual_seed(seed)

    def normal_(t: torch.Tensor, std: float) -> None:
        t.copy_(torch.randn(t.shape, generator=gen, dtype=torch.float32).to(t.dtype) * std)

    for name, module in model.named_modules():
        if isinstance(module, (nn.Linear, nn.Conv2d, nn.Conv3d)):
            fan_in = module.weight[0].numel()
            normal_(module.weight, _gain(name, projector) / math.sqrt(fan_in))
            if module.bias is not None:
                normal_(module.bias, 0.02)
        elif isinstance(module, nn.LayerNorm):
            module.weight.fill_(1.0)
            module.bias.zero_()
        elif type(module).__name__.endswith("RMSNorm"):
            module.weight.fill_(1.0)
        if isinstance(module, GotOcr2VisionAttention) and module.use_rel_pos:
            normal_(module.rel_pos_h, 0.1)
            normal_(module.rel_pos_w, 0.1)
        if isinstance(module, GotOcr2VisionEncoder) and module.pos_embed is not None:
            normal_(module.pos_embed, 0.5)
    # Last: with tied embeddings the LM head (an nn.Linear) shares this tensor.
    normal_(model.get_input_embeddings().weight, 1.0)
    model.tie_weights()


def synthetic_images(n: int = CALIBRATION_IMAGES, *, seed: int = 0) -> list[Image.Image]:
    """``n`` deterministic RGB test images: text lines and shapes on coloured paper.

    Sizes differ (the processor resizes them), and every image has different content so a
    random-weight model gives different greedy outputs.
    """
    words = ["OCR", "page", "x=1", "Total", "42", "café", "table", "3.14", "A-B", "note"]
    images = []
    for i in range(n):
        rng = random.Random(seed * 1000 + i)
        width, height = rng.choice([(160, 120), (200, 100), (128, 128), (240, 180), (96, 160)])
        paper = tuple(rng.randint(200, 255) for _ in range(3))
        image = Image.new("RGB", (width, height), paper)
        draw = ImageDraw.Draw(image)
        for _ in range(rng.randint(1, 4)):
            x0, y0 = rng.randint(0, width - 20), rng.randint(0, height - 20)
            x1, y1 = rng.randint(x0 + 10, width), rng.randint(y0 + 10, height)
            color = tuple(rng.randint(0, 200) for _ in range(3))
            if rng.random() < 0.5:
                draw.rectangle((x0, y0, x1, y1), fill=color)
            else:
                draw.ellipse((x0, y0, x1, y1), outline=color, width=3)
        for line in range(rng.randint(1, 5)):
            text = " ".join(rng.choice(words) for _ in range(rng.randint(1, 4)))
            ink = tuple(rng.randint(0, 120) for _ in range(3))
            draw.text((rng.randint(0, 20), 5 + line * 18), text, fill=ink)
        images.append(image)
    return images


def _greedy(model: nn.Module, inputs: Any, features: torch.Tensor, steps: int) -> list:
    """Greedy continuation token ids (no stop) of a batch of prompts, image features given.

    Embeds the prompts with the *current* embedding matrix and scatters the (precomputed)
    image features in, as ``GotOcr2Model.forward`` does, so the vision tower runs once.
    """
    ids = inputs["input_ids"]
    embeds = model.get_input_embeddings()(ids)
    mask = (ids == model.config.image_token_id).unsqueeze(-1)
    embeds = embeds.masked_scatter(mask, features.to(embeds.dtype))
    out = model.generate(
        inputs_embeds=embeds,
        attention_mask=inputs["attention_mask"],
        do_sample=False,
        max_new_tokens=steps,
        min_new_tokens=steps,
        eos_token_id=None,
        pad_token_id=model.generation_config.pad_token_id,
    )
    return out[:, -steps:].tolist()


def _stop_index(seq: Sequence[int], stop_ids: set[int]) -> int | None:
    return next((i for i, t in enumerate(seq) if t in stop_ids), None)


@torch.no_grad()
def _calibrate_mixed_stops(
    model: nn.Module, processor: Any, stop_id: int, images: Sequence[Image.Image]
) -> tuple[int, list[list[int]]]:
    """Pick the stand-in token X for ``<|im_end|>`` (see the module doc); return it and the
    resulting greedy sequences (cut after their stop)."""
    inputs = processor(list(images), return_tensors="pt")
    features = model.model.get_image_features(inputs["pixel_values"]).pooler_output
    emb = model.get_input_embeddings().weight
    stop_ids = {stop_id}
    emb[stop_id].zero_()
    base = _greedy(model, inputs, features, CALIBRATION_STEPS)
    target = len(images) / 2
    candidates: dict[int, int] = {}
    for seq in base:
        for tok in set(seq[1:]):
            if tok != stop_id:
                candidates[tok] = candidates.get(tok, 0) + 1
    ranked = sorted(candidates, key=lambda t: (abs(candidates[t] - target), t))
    for token in ranked[:40]:
        emb[stop_id] = 1.25 * emb[token]
        seqs = _greedy(model, inputs, features, CALIBRATION_STEPS)
        stops = [_stop_index(s, stop_ids) for s in seqs]
        early = sum(1 for s in stops if s is not None and s >= 1)
        full = sum(1 for s in stops if s is None)
        distinct = len({tuple(s) for s in seqs})
        if early >= 2 and full >= 2 and early + full == len(seqs) and distinct >= len(seqs) - 1:
            return token, [s if i is None else s[: i + 1] for s, i in zip(seqs, stops, strict=True)]
    raise RuntimeError("no stand-in token gives a mix of stopping sequences; try another seed")


def build_got_ocr2(
    out_dir: Path | str,
    size: str | GotSize = "tiny",
    *,
    seed: int = 0,
    eos_mode: EosMode | None = None,
    dtype: torch.dtype | None = None,
) -> Path:
    """Build a random-weight GOT-OCR2 of ``size`` and ``save_pretrained`` it to ``out_dir``.

    ``size`` is a key of :data:`SIZES` or a :class:`GotSize`.  ``eos_mode`` defaults to
    ``"mixed"`` for ``"tiny"`` and ``"never"`` otherwise (see the module docstring).  ``dtype``
    is the saved weight dtype (default float32 for ``"tiny"``/custom sizes, bfloat16 for
    ``"mid"``/``"real"``, like the real checkpoint).  Writes model, generation config,
    tokenizer, image processor and processor, plus ``ragws_got_build.json`` describing the
    build.  Returns ``out_dir``.
    """
    from transformers import (
        GenerationConfig,
        GotOcr2ForConditionalGeneration,
        GotOcr2ImageProcessor,
        GotOcr2Processor,
    )

    spec = SIZES[size] if isinstance(size, str) else size
    name = next((key for key, value in SIZES.items() if value == spec), "custom")
    if image_tokens_for(spec.image_size, spec.patch_size) != GotOcr2Processor.num_image_tokens:
        raise ValueError(
            f"image_size {spec.image_size} / patch_size {spec.patch_size} gives "
            f"{image_tokens_for(spec.image_size, spec.patch_size)} image tokens; the processor "
            f"always inserts {GotOcr2Processor.num_image_tokens} (need 61..64 patches a side)"
        )
    if eos_mode is None:
        eos_mode = _DEFAULT_EOS_MODE.get(name, "mixed")
    if dtype is None:
        dtype = torch.bfloat16 if name in ("mid", "real") else torch.float32
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)

    tokenizer = build_got_tokenizer(spec.regular_vocab)
    image_processor = GotOcr2ImageProcessor(
        do_resize=True,
        size={"height": spec.image_size, "width": spec.image_size},
        do_rescale=True,
        rescale_factor=1 / 255,
        do_normalize=True,
        image_mean=[0.48145466, 0.4578275, 0.40821073],
        image_std=[0.26862954, 0.26130258, 0.27577711],
    )
    processor = GotOcr2Processor(image_processor=image_processor, tokenizer=tokenizer)
    config = _make_config(spec, tokenizer)

    torch.manual_seed(seed)
    model = GotOcr2ForConditionalGeneration(config).eval()
    randomize(model, seed)

    eot = tokenizer.convert_tokens_to_ids("<|endoftext|>")
    im_end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    model.generation_config = GenerationConfig(
        bos_token_id=eot, eos_token_id=[im_end, eot], pad_token_id=eot
    )
    emb = model.get_input_embeddings().weight
    info: dict[str, Any] = {
        "size": name,
        "seed": seed,
        "eos_mode": eos_mode,
        "image_tokens": config.image_seq_length,
        "stop_token_ids": [im_end, eot],
    }
    with torch.no_grad():
        # Tokens the real model never emits get zero rows (logit 0, never the argmax): the
        # unused extras/ref/box/quad tokens, and <imgpad>, whose input embedding is always
        # replaced by image features.  Prompt-only tokens keep a (shrunk) random row: their
        # input embedding matters, and the small norm makes them rare as outputs.
        in_prompt = ["<|im_start|>", "<img>", "</img>"]
        never = [
            t for t in GOT_SPECIAL_TOKENS if t not in (*in_prompt, "<|im_end|>", "<|endoftext|>")
        ]
        emb[tokenizer.convert_tokens_to_ids(never)] = 0.0
        emb[tokenizer.convert_tokens_to_ids(in_prompt)] *= 0.25
        if eos_mode in ("mixed", "never"):
            emb[eot].zero_()
        if eos_mode == "never":
            emb[im_end].zero_()
        elif eos_mode == "mixed":
            images = synthetic_images(CALIBRATION_IMAGES, seed=seed)
            standin, seqs = _calibrate_mixed_stops(model, processor, im_end, images)
            info["standin_token_id"] = standin
            info["calibration"] = {
                "images": f"synthetic_images({CALIBRATION_IMAGES}, seed={seed})",
                "prompt": "plain (processor default)",
                "max_new_tokens": CALIBRATION_STEPS,
                "greedy_ids": seqs,
            }

    model.to(dtype)
    model.save_pretrained(out_dir)
    processor.save_pretrained(out_dir)
    (out_dir / BUILD_INFO_FILE).write_text(json.dumps(info, indent=1) + "\n", encoding="utf-8")
    return out_dir


def build_tiny_got_ocr2(
    out_dir: Path | str,
    *,
    seed: int = 0,
    text_hidden: int = 64,
    text_layers: int = 2,
    text_heads: int = 4,
    text_kv_heads: int = 2,
    regular_vocab: int = 1024,
    eos_mode: EosMode = "mixed",
) -> Path:
    """Build the tiny test checkpoint (see :func:`build_got_ocr2` and the module doc).

    The text model is a Qwen2 of ``text_hidden`` × ``text_layers`` with ``text_heads`` query
    and ``text_kv_heads`` KV heads (GQA when fewer); the vocabulary is ``regular_vocab``
    byte-level BPE tokens + 217 GOT special tokens.  The vision tower is a 2-layer SAM ViT
    (windowed attention only: a global layer over the 64 × 64 grid would cost ~0.3 s per
    image on CPU) on 128 px images with 2 px patches: a 64 × 64 grid, i.e. the processor's
    256 image tokens.
    """
    spec = dataclasses.replace(
        SIZES["tiny"],
        text_hidden=text_hidden,
        text_layers=text_layers,
        text_heads=text_heads,
        text_kv_heads=text_kv_heads,
        text_intermediate=2 * text_hidden,
        regular_vocab=regular_vocab,
    )
    return build_got_ocr2(out_dir, spec, seed=seed, eos_mode=eos_mode)


def main(argv: Sequence[str] | None = None) -> None:
    """``python -m ragws.testing.got_tiny OUT_DIR [--size tiny|mid|real] [--seed N]``."""
    parser = argparse.ArgumentParser(description="Build a random-weight GOT-OCR2 checkpoint.")
    parser.add_argument("out_dir", type=Path)
    parser.add_argument("--size", choices=sorted(SIZES), default="tiny")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--eos-mode", choices=["mixed", "never", "natural"], default=None)
    args = parser.parse_args(argv)
    out = build_got_ocr2(args.out_dir, args.size, seed=args.seed, eos_mode=args.eos_mode)
    print(out)


if __name__ == "__main__":
    main()
