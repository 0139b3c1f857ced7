"""The Qwen2-style text decoder of a VLM, replayed over the checkpoint's own modules.

GOT-OCR2's language model is a Qwen2; Qwen2-VL's and Qwen2.5-VL's are the same layers with
multi-axis rotary positions (M-RoPE). Every layer is: RMSNorm → q/k/v projections → rotary
embedding → attention → ``o_proj`` → residual → RMSNorm → MLP → residual; then a final norm and
the LM head. :class:`TextDecoder` runs that loop with the layers' own modules and the slot
runner's :class:`~ragws.models.slot_runner.SlotAttention` in place of transformers' attention
and cache, so a family's :class:`~ragws.models.slot_runner.SlotModel` ``embed``, ``forward``
and ``logits`` are one call each.

Rotary positions are whatever the text model's ``rotary_emb`` takes: ``(B, L)`` for Qwen2,
``(B, L)`` or ``(3, B, L)`` for the Qwen2-VL family, whose rotary embedding spreads a 2-D
position over its three axes itself.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from ragws.models.slot_runner import SlotAttention

__all__ = ["TextDecoder", "freeze_tokenizer_settings"]


@dataclass(slots=True)
class TextDecoder:
    """A loaded text model (``embed_tokens``, ``layers``, ``norm``, ``rotary_emb``) and its LM
    head, with the shapes the KV cache needs."""

    lm: Any
    lm_head: Any
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    scale: float  # the attention's softmax scale (head_dim ** -0.5 for these models)

    @classmethod
    def of(cls, lm: Any, lm_head: Any, text_config: Any, spec: str) -> TextDecoder:
        """The decoder of a loaded model; NotImplementedError for layers it cannot replay."""
        if "sliding_attention" in (getattr(text_config, "layer_types", None) or ()):
            raise NotImplementedError(f"{spec}: sliding-window attention layers are not supported")
        attn = lm.layers[0].self_attn
        return cls(
            lm=lm,
            lm_head=lm_head,
            num_layers=text_config.num_hidden_layers,
            num_heads=text_config.num_attention_heads,
            num_kv_heads=text_config.num_key_value_heads,
            head_dim=attn.head_dim,
            scale=attn.scaling,
        )

    def embed(
        self, ids: torch.Tensor, images: list[torch.Tensor] | None, image_token_id: int
    ) -> torch.Tensor:
        """Token embeddings, with the image features (in row order) written over the image
        placeholders, as the models' own ``masked_scatter`` does."""
        embeds = self.lm.embed_tokens(ids)
        if images is None:
            return embeds
        mask = (ids == image_token_id).unsqueeze(-1)
        image = torch.cat(images).to(embeds.dtype)
        if int(mask.sum()) * embeds.shape[-1] != image.numel():
            raise ValueError("image placeholders and image features differ in number")
        return embeds.masked_scatter(mask, image)

    def forward(
        self, embeds: torch.Tensor, positions: torch.Tensor, attention: SlotAttention
    ) -> torch.Tensor:
        """The decoder layers at rotary ``positions``; hidden states before the final norm."""
        cos, sin = self.lm.rotary_emb(embeds, positions)
        h = embeds
        for i, layer in enumerate(self.lm.layers):
            q, k, v = self._qkv(layer, h, cos, sin)
            h = self._finish_layer(layer, h, attention(i, q, k, v, scale=self.scale))
        return h

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Final norm and LM head: ``(B, hidden)`` → ``(B, vocab)``."""
        return self.lm_head(self.lm.norm(hidden))

    def _qkv(
        self, layer: Any, h: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Pre-norm, projections and rotary embedding: ``(B, heads, L, head_dim)`` each."""
        attn = layer.self_attn
        x = layer.input_layernorm(h)
        batch, length, _ = x.shape
        q = attn.q_proj(x).view(batch, length, -1, self.head_dim).transpose(1, 2)
        k = attn.k_proj(x).view(batch, length, -1, self.head_dim).transpose(1, 2)
        v = attn.v_proj(x).view(batch, length, -1, self.head_dim).transpose(1, 2)
        cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
        q = q * cos + _rotate_half(q) * sin
        k = k * cos + _rotate_half(k) * sin
        return q, k, v

    def _finish_layer(self, layer: Any, h: torch.Tensor, attn_out: torch.Tensor) -> torch.Tensor:
        """Output projection and residual, then the post-norm MLP and residual."""
        batch, _, length, _ = attn_out.shape
        h = h + layer.self_attn.o_proj(attn_out.transpose(1, 2).reshape(batch, length, -1))
        return h + layer.mlp(layer.post_attention_layernorm(h))


def freeze_tokenizer_settings(tokenizer: Any) -> None:
    """Clear padding/truncation on the Rust tokenizer once, so that encodes never mutate it
    (a mutation racing another thread's encode raises "Already borrowed")."""
    backend = getattr(tokenizer, "_tokenizer", None)
    if backend is None:
        return
    if backend.truncation is not None:
        backend.no_truncation()
    if backend.padding is not None:
        backend.no_padding()


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)
