"""The tiny random-weight GOT-OCR2 checkpoint loads and runs like the real one."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
if not hasattr(transformers, "GotOcr2ForConditionalGeneration"):
    pytest.skip("this transformers has no GOT-OCR2", allow_module_level=True)

from transformers import AutoProcessor, GotOcr2ForConditionalGeneration  # noqa: E402

from ragws.testing.got_tiny import (  # noqa: E402
    BUILD_INFO_FILE,
    CALIBRATION_IMAGES,
    CALIBRATION_STEPS,
    GOT_SPECIAL_TOKENS,
    build_tiny_got_ocr2,
    image_tokens_for,
    synthetic_images,
)

SYSTEM = "system\nYou should follow the instructions carefully and explain your answers in detail."


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, float]:
    out = tmp_path_factory.mktemp("got_tiny")
    start = time.perf_counter()
    build_tiny_got_ocr2(out)
    return out, time.perf_counter() - start


@pytest.fixture(scope="module")
def loaded(tiny_dir: tuple[Path, float]) -> tuple[Any, Any]:
    path, _ = tiny_dir
    model = GotOcr2ForConditionalGeneration.from_pretrained(path, dtype=torch.float32).eval()
    processor = AutoProcessor.from_pretrained(path)
    return model, processor


def _new_tokens(model: Any, inputs: Any, max_new_tokens: int = 20) -> list[list[int]]:
    with torch.no_grad():
        out = model.generate(**inputs, do_sample=False, max_new_tokens=max_new_tokens)
    return out[:, inputs["input_ids"].shape[1] :].tolist()


def test_build_is_small_and_fast(tiny_dir: tuple[Path, float]) -> None:
    path, seconds = tiny_dir
    size = sum(f.stat().st_size for f in path.iterdir())
    assert size < 20 * 2**20
    assert seconds < 60  # ~1 s on 2 idle CPU cores; far slower when the cores are shared
    names = {f.name for f in path.iterdir()}
    assert {"config.json", "model.safetensors", "generation_config.json"} <= names
    assert {"tokenizer.json", "tokenizer_config.json", "processor_config.json"} <= names


def test_loads_like_the_real_checkpoint(loaded: tuple[Any, Any]) -> None:
    model, processor = loaded
    assert type(processor).__name__ == "GotOcr2Processor"
    assert type(processor.image_processor).__name__.startswith("GotOcr2ImageProcessor")
    assert model.dtype == torch.float32
    cfg = model.config
    tok = processor.tokenizer
    assert cfg.image_token_id == tok.convert_tokens_to_ids("<imgpad>") == processor.image_token_id
    assert cfg.text_config.vocab_size == len(tok)
    assert cfg.text_config.num_key_value_heads < cfg.text_config.num_attention_heads  # GQA
    assert tok.eos_token == tok.pad_token == tok.bos_token == "<|endoftext|>"
    # Special tokens follow the regular vocabulary in GOT's order, <imgpad> last.
    ids = tok.convert_tokens_to_ids(list(GOT_SPECIAL_TOKENS))
    assert ids == list(range(ids[0], ids[0] + len(GOT_SPECIAL_TOKENS)))
    assert ids[-1] == len(tok) - 1
    im_end = tok.convert_tokens_to_ids("<|im_end|>")
    assert model.generation_config.eos_token_id == [im_end, tok.eos_token_id]


@pytest.mark.parametrize("fmt", [False, True])
def test_prompt_layout(loaded: tuple[Any, Any], fmt: bool) -> None:
    _, processor = loaded
    inputs = processor(synthetic_images(1)[0], return_tensors="pt", format=fmt)
    text = processor.tokenizer.decode(inputs["input_ids"][0])
    query = "OCR with format: " if fmt else "OCR: "
    expected = (
        f"<|im_start|>{SYSTEM}<|im_end|><|im_start|>user\n<img>"
        + "<imgpad>" * 256
        + f"</img>\n {query}<|im_end|><|im_start|>assistant\n"
    )
    assert text == expected
    assert inputs["pixel_values"].shape == (1, 3, 128, 128)


def test_image_token_count_matches_vision_output(loaded: tuple[Any, Any]) -> None:
    model, processor = loaded
    inputs = processor(synthetic_images(2), return_tensors="pt")
    n_placeholders = (inputs["input_ids"] == model.config.image_token_id).sum(dim=1)
    with torch.no_grad():
        features = model.model.get_image_features(inputs["pixel_values"]).pooler_output
    assert features.shape == (2, 256, model.config.text_config.hidden_size)
    assert n_placeholders.tolist() == [features.shape[1]] * 2
    vision = model.config.vision_config
    assert image_tokens_for(vision.image_size, vision.patch_size) == features.shape[1]
    assert model.config.image_seq_length == features.shape[1]


@pytest.mark.parametrize("fmt", [False, True])
def test_greedy_output_depends_on_the_image(loaded: tuple[Any, Any], fmt: bool) -> None:
    model, processor = loaded
    images = synthetic_images(4, seed=3)
    outputs = [
        tuple(_new_tokens(model, processor(image, return_tensors="pt", format=fmt))[0])
        for image in images
    ]
    assert all(len(o) >= 1 for o in outputs)
    assert len(set(outputs)) >= 3


def test_mixed_stops_are_reproducible(tiny_dir: tuple[Path, float], loaded: tuple[Any, Any]):
    """The recorded calibration is golden data: the reloaded model reproduces it, and some
    sequences stop on <|im_end|> after at least one token while others run to the limit."""
    path, _ = tiny_dir
    model, processor = loaded
    info = json.loads((path / BUILD_INFO_FILE).read_text())
    assert info["eos_mode"] == "mixed"
    expected = info["calibration"]["greedy_ids"]
    inputs = processor(synthetic_images(CALIBRATION_IMAGES), return_tensors="pt")
    got = _new_tokens(model, inputs, CALIBRATION_STEPS)
    im_end = processor.tokenizer.convert_tokens_to_ids("<|im_end|>")
    pad = processor.tokenizer.pad_token_id
    trimmed = [row[: row.index(im_end) + 1] if im_end in row else row for row in got]
    assert trimmed == expected
    assert all(t == pad for row, cut in zip(got, trimmed, strict=True) for t in row[len(cut) :])
    stopped = [row for row in expected if row[-1] == im_end]
    assert any(len(row) > 1 for row in stopped)
    assert any(len(row) == CALIBRATION_STEPS and im_end not in row for row in expected)


def test_byte_level_tokenizer_round_trips(loaded: tuple[Any, Any]) -> None:
    _, processor = loaded
    tok = processor.tokenizer
    for text in ["café 中文 ∑ 🙂", "naïve Straße\n\t$\\frac{a}{b}$", "日本語 ∞ °C ±1"]:
        ids = tok(text, add_special_tokens=False)["input_ids"]
        assert tok.decode(ids) == text
    # A character can span several tokens: a prefix decodes to U+FFFD.
    ids = tok("🙂", add_special_tokens=False)["input_ids"]
    assert len(ids) > 1
    assert tok.decode(ids[:1]) == "\ufffd"
    # Special tokens are atomic and dropped by skip_special_tokens.
    ids = tok("<|im_end|>x", add_special_tokens=False)["input_ids"]
    assert ids[0] == tok.convert_tokens_to_ids("<|im_end|>")
    assert tok.decode(ids, skip_special_tokens=True) == "x"


def test_crop_to_patches_multiplies_image_tokens(loaded: tuple[Any, Any]) -> None:
    model, processor = loaded
    image = synthetic_images(1)[0].resize((384, 128))
    inputs = processor(image, return_tensors="pt", crop_to_patches=True, max_patches=4)
    tiles = inputs["pixel_values"].shape[0]
    assert tiles > 1  # the tiles plus a thumbnail
    assert (inputs["input_ids"] == model.config.image_token_id).sum() == 256 * tiles
    assert "OCR upon the patch reference: " in processor.tokenizer.decode(inputs["input_ids"][0])
    assert len(_new_tokens(model, inputs, 3)[0]) == 3


def _rotate_half(x: Any) -> Any:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def test_pieces_reproduce_the_forward(loaded: tuple[Any, Any]) -> None:
    """Vision → projector → masked scatter → a hand-written Qwen2 decoder → LM head equals
    ``model(**inputs).logits``: the recipe a custom decode loop follows."""
    model, processor = loaded
    inputs = processor(synthetic_images(1, seed=5)[0], return_tensors="pt")
    ids = inputs["input_ids"]
    text_cfg = model.config.text_config
    lm = model.model.language_model
    with torch.no_grad():
        reference = model(**inputs).logits

        feats = model.model.get_image_features(inputs["pixel_values"]).pooler_output
        embeds = lm.embed_tokens(ids)
        mask = (ids == model.config.image_token_id).unsqueeze(-1)
        embeds = embeds.masked_scatter(mask, feats.to(embeds.dtype))

        n_heads, n_kv = text_cfg.num_attention_heads, text_cfg.num_key_value_heads
        head_dim = text_cfg.hidden_size // n_heads
        theta = text_cfg.rope_parameters["rope_theta"]
        seq = ids.shape[1]
        inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2, dtype=torch.float) / head_dim)
        freqs = torch.arange(seq, dtype=torch.float)[:, None] * inv_freq[None, :]
        cos, sin = torch.cat((freqs, freqs), -1).cos(), torch.cat((freqs, freqs), -1).sin()
        causal = torch.full((seq, seq), float("-inf")).triu(1)

        eps = text_cfg.rms_norm_eps

        def rms(x: Any, weight: Any) -> Any:
            return weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps))

        h = embeds[0]
        for layer in lm.layers:
            att = layer.self_attn
            assert att.q_proj.bias is not None and att.o_proj.bias is None
            x = rms(h, layer.input_layernorm.weight)
            q = att.q_proj(x).view(seq, n_heads, head_dim).transpose(0, 1)
            k = att.k_proj(x).view(seq, n_kv, head_dim).transpose(0, 1)
            v = att.v_proj(x).view(seq, n_kv, head_dim).transpose(0, 1)
            q, k = q * cos + _rotate_half(q) * sin, k * cos + _rotate_half(k) * sin
            k = k.repeat_interleave(n_heads // n_kv, dim=0)
            v = v.repeat_interleave(n_heads // n_kv, dim=0)
            scores = q @ k.transpose(-1, -2) * head_dim**-0.5 + causal
            out = (scores.softmax(-1) @ v).transpose(0, 1).reshape(seq, -1)
            h = h + att.o_proj(out)
            x = rms(h, layer.post_attention_layernorm.weight)
            mlp = layer.mlp
            h = h + mlp.down_proj(torch.nn.functional.silu(mlp.gate_proj(x)) * mlp.up_proj(x))
        logits = model.lm_head(rms(h, lm.norm.weight))
    torch.testing.assert_close(logits, reference[0], rtol=1e-4, atol=1e-3)
