"""A Llama-architecture decoder in plain torch (RMSNorm, rotary position embeddings, grouped-query
attention, SwiGLU, tied or untied embeddings), exported to ONNX with or without past key/value
inputs, and data for it: token ids, position ids, cache tensors from a real prefix, targets.

Graph inputs with a cache: input_ids [batch, seq], position_ids [batch, seq], past_key.{i} and
past_value.{i} [batch, kv_heads, past, head_dim]; outputs: logits [batch, seq, vocab] and
present_key.{i}, present_value.{i} [batch, kv_heads, past + seq, head_dim].
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn


@dataclass(frozen=True)
class LlamaShape:
    vocab: int = 256
    dim: int = 64
    layers: int = 2
    heads: int = 4
    kv_heads: int = 2
    ffn: int = 128
    tied: bool = True

    @property
    def head_dim(self) -> int:
        return self.dim // self.heads


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-5) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x):
        return self.weight * x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)


def _rotate_half(x):
    a, b = x.chunk(2, dim=-1)
    return torch.cat((-b, a), dim=-1)


class Attention(nn.Module):
    def __init__(self, s: LlamaShape) -> None:
        super().__init__()
        self.s = s
        self.q_proj = nn.Linear(s.dim, s.heads * s.head_dim, bias=False)
        self.k_proj = nn.Linear(s.dim, s.kv_heads * s.head_dim, bias=False)
        self.v_proj = nn.Linear(s.dim, s.kv_heads * s.head_dim, bias=False)
        self.o_proj = nn.Linear(s.heads * s.head_dim, s.dim, bias=False)

    def forward(self, x, cos, sin, past_k=None, past_v=None):
        s = self.s
        b, t, _ = x.shape
        q = self.q_proj(x).view(b, t, s.heads, s.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(b, t, s.kv_heads, s.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(b, t, s.kv_heads, s.head_dim).transpose(1, 2)
        q, k = q * cos + _rotate_half(q) * sin, k * cos + _rotate_half(k) * sin
        if past_k is not None:
            k, v = torch.cat([past_k, k], dim=2), torch.cat([past_v, v], dim=2)
        present = (k, v)
        rep = s.heads // s.kv_heads  # grouped-query attention: each kv head serves `rep` query heads
        k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
        past = k.shape[2] - t
        q_pos = torch.arange(t, device=x.device)[:, None] + past
        causal = torch.arange(k.shape[2], device=x.device)[None, :] <= q_pos
        scores = (q @ k.transpose(-1, -2)) / (s.head_dim ** 0.5)
        scores = scores.masked_fill(~causal, -1e4)
        out = (scores.softmax(-1) @ v).transpose(1, 2).reshape(b, t, s.heads * s.head_dim)
        return self.o_proj(out), present


class Block(nn.Module):
    def __init__(self, s: LlamaShape) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(s.dim)
        self.self_attn = Attention(s)
        self.post_attention_layernorm = RMSNorm(s.dim)
        self.gate_proj = nn.Linear(s.dim, s.ffn, bias=False)
        self.up_proj = nn.Linear(s.dim, s.ffn, bias=False)
        self.down_proj = nn.Linear(s.ffn, s.dim, bias=False)

    def forward(self, x, cos, sin, past_k=None, past_v=None):
        a, present = self.self_attn(self.input_layernorm(x), cos, sin, past_k, past_v)
        x = x + a
        h = self.post_attention_layernorm(x)
        return x + self.down_proj(nn.functional.silu(self.gate_proj(h)) * self.up_proj(h)), present


class TinyLlama(nn.Module):
    def __init__(self, s: LlamaShape, cache: bool = True) -> None:
        super().__init__()
        self.s, self.cache = s, cache
        self.embed_tokens = nn.Embedding(s.vocab, s.dim)
        self.layers = nn.ModuleList(Block(s) for _ in range(s.layers))
        self.norm = RMSNorm(s.dim)
        self.lm_head = nn.Linear(s.dim, s.vocab, bias=False)
        if s.tied:
            self.lm_head.weight = self.embed_tokens.weight
        inv = 1.0 / (10000 ** (torch.arange(0, s.head_dim, 2).float() / s.head_dim))
        self.register_buffer("inv_freq", inv, persistent=False)

    def forward(self, input_ids, position_ids, *past):
        freqs = position_ids[..., None].float() * self.inv_freq
        emb = torch.cat([freqs, freqs], dim=-1)[:, None]
        cos, sin = emb.cos(), emb.sin()
        x = self.embed_tokens(input_ids)
        presents = []
        for i, layer in enumerate(self.layers):
            pk, pv = (past[2 * i], past[2 * i + 1]) if past else (None, None)
            x, (k, v) = layer(x, cos, sin, pk, pv)
            presents += [k, v]
        logits = self.lm_head(self.norm(x))
        return (logits, *presents) if self.cache else logits


def build(s: LlamaShape = LlamaShape(), cache: bool = True, seed: int = 0) -> TinyLlama:
    torch.manual_seed(seed)
    model = TinyLlama(s, cache).eval()
    with torch.no_grad():  # an untrained model with peaked next-token distributions, as trained ones have
        model.embed_tokens.weight.normal_(0, 0.1)
        if not s.tied:  # separate tensors, starting equal
            model.lm_head.weight.copy_(model.embed_tokens.weight)
        for p in model.layers.parameters():
            if p.ndim == 2:
                p.normal_(0, 0.5 / p.shape[1] ** 0.5)
    return model


def cache_names(s: LlamaShape, prefix: str) -> list[str]:
    return [f"{prefix}_{kind}.{i}" for i in range(s.layers) for kind in ("key", "value")]


def export(model: TinyLlama, path: Path, past: int = 3) -> Path:
    """ONNX with dynamic batch, sequence and past lengths (TorchScript exporter, opset 17)."""
    s = model.s
    ids = torch.zeros(2, 4, dtype=torch.long)
    pos = torch.arange(past, past + 4)[None].repeat(2, 1)
    kv = [torch.zeros(2, s.kv_heads, past, s.head_dim) for _ in range(2 * s.layers)] if model.cache else []
    names = ["input_ids", "position_ids", *(cache_names(s, "past") if model.cache else [])]
    outs = ["logits", *(cache_names(s, "present") if model.cache else [])]
    axes = {n: {0: "batch", 1: "seq"} for n in ("input_ids", "position_ids", "logits")}
    for n in names[2:]:
        axes[n] = {0: "batch", 2: "past"}
    for n in outs[1:]:
        axes[n] = {0: "batch", 2: "total"}
    torch.onnx.export(model, (ids, pos, *kv), str(path), input_names=names, output_names=outs,
                      dynamic_axes=axes, opset_version=17, dynamo=False)
    return path


def make_data(model: TinyLlama, path: Path, samples: int, past: int = 3, seq: int = 4, seed: int = 1) -> Path:
    """Token sequences of past + seq + 1 tokens: the cache comes from running the prefix through the
    model itself; `targets` are the tokens that follow each new position."""
    rng = np.random.default_rng(seed)
    s = model.s
    tokens = torch.from_numpy(rng.integers(0, s.vocab, (samples, past + seq + 1)))
    arrays: dict[str, np.ndarray] = {}
    with torch.no_grad():
        if model.cache:
            prefix_pos = torch.arange(past)[None].repeat(samples, 1)
            presents = model(tokens[:, :past], prefix_pos)[1:]
            arrays.update({n: t.numpy() for n, t in zip(cache_names(s, "past"), presents)})
            start = past
        else:
            start = 0
    ids = tokens[:, start:start + seq]
    arrays["input_ids"] = ids.numpy()
    arrays["position_ids"] = np.broadcast_to(np.arange(start, start + seq), ids.shape).astype(np.int64).copy()
    arrays["targets"] = tokens[:, start + 1:start + seq + 1].numpy()
    np.savez(path, **arrays)
    return path
