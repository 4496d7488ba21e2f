"""SortedNet: many nested sub-networks in one set of weights, picked by budget at inference.

Valipour et al., "SortedNet, a Place for Every Network and Every Network in its Place", arXiv 2309.00255;
relatives: slimmable networks (Yu et al. 2019, the sandwich rule and in-place distillation), DynaBERT
(Hou et al. 2020, width x depth BERT with importance re-ordering), MatFormer (nested MLP widths).
Plain PyTorch; no Ray here.

Sub-networks are *prefixes* of the full network. A sub-model is a grid point
``{"layers": l, "width": w, "heads": h}``: the first ``l`` layers (a shared classification head reads
the l-th layer), in each of them the first ``k = round(w * I)`` units of the MLP (``I`` the full
intermediate size: rows ``[:k]`` of the up-projection, columns ``[:, :k]`` of the down-projection) and
the first ``h`` attention heads (rows ``[:h*d]`` of the query/key/value projections, columns
``[:, :h*d]`` of the output projection, ``d`` the head size). Slicing happens inside each linear
layer's own ``forward`` (:class:`SlicedLinear`), so the sub-models never copy weights and DeepSpeed
ZeRO-3 gathers each layer's full parameter before it is sliced.

Models
    * :class:`NestedEncoder`: a BERT-family encoder (BERT, RoBERTa, MiniLM, ...: the weights of any
      transformers ``BertModel``-style checkpoint) with mean pooling over non-padding tokens and a
      linear head, nested along depth, MLP width and heads (default the bundled all-MiniLM-L6-v2:
      6 layers, hidden 384, 12 heads, MLP 1536; default grid 6 depths x 8 widths x 4 head counts = 192).
    * :class:`NestedMLP`: an MLP classifier for rows (standardised inputs, ReLU), nested along depth and
      width (default 5 layers of 256 units, grid 5 depths x 32 widths = 160).

Importance re-ordering (``reorder: magnitude``, encoders): before training, the heads of every layer
are sorted by the norm of their output-projection columns times that of their value rows, and the MLP
neurons by ‖W_in[i]‖·‖W_out[:, i]‖ (a weight-magnitude proxy of DynaBERT's importance); the
permutation leaves the full model's function unchanged and puts the most important units first, where
every sub-model keeps them.

Activation density (optional, DEFT, Runwal et al. 2024): the mean over layers of the mean over
non-padding tokens and kept MLP features of a²/(a²+ε), the same term as :mod:`densiray.models.deft`.
"""

from __future__ import annotations

import math
import os
import statistics
import threading
import time
from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field, field_validator
from torch import nn

from densiray.errors import BudgetError, ConfigError, DataError

ENCODER_TYPES = ("bert", "roberta", "xlm-roberta", "camembert", "electra")
BUDGET_KEYS = ("flops", "latency_ms", "params")


class SortedNetConfig(BaseModel):
    """A SortedNet classifier: architecture, grid of sub-models and how each step samples them."""

    model_config = ConfigDict(extra="forbid")

    arch: Literal["auto", "encoder", "mlp"] = Field("auto", description="auto: encoder for text data, mlp for rows")
    # encoder
    model: str = Field("minilm", description="encoder: 'minilm' (bundled), a Hugging Face name or a local folder")
    max_length: int = Field(128, ge=8, le=8192, description="encoder: tokens per text")
    reorder: Literal["none", "magnitude"] = Field("magnitude", description="encoder: sort heads/neurons by importance first")
    # MLP
    hidden: int = Field(256, ge=2, le=65536, description="mlp: units per hidden layer")
    depth: int = Field(5, ge=1, le=64, description="mlp: hidden layers")
    dropout: float | None = Field(None, ge=0, lt=1, description="None: the encoder's own, 0 for the MLP")
    # the grid
    grid: str | None = Field(None, description="'DxWxH': D depths, W width fractions, H head counts, evenly "
                                               "spaced up to the full model (mlp: 'DxW'); None: every depth x 8 "
                                               "widths x 4 head counts (mlp: every depth x 32 widths)")
    layers: list[int] | None = Field(None, description="explicit depths of the grid (override grid)")
    widths: list[float] | None = Field(None, description="explicit MLP width fractions in (0, 1]")
    heads: list[int] | None = Field(None, description="explicit head counts")
    # training
    samples_per_step: int = Field(2, ge=0, le=1024, description="sorted: K sub-networks (passes) per step, the full "
                                  "model among them with probability full_prob; sandwich/random: K sub-models "
                                  "beside the full model; 0: plain fine-tuning of the full model")
    sampling: Literal["sorted", "sandwich", "random"] = Field(
        "sorted", description="sorted: K (width, heads) points per step, every depth of each in one pass; "
                              "sandwich: the full model + the smallest + K-1 random; random: the full model + K random")
    full_prob: float = Field(1.0, ge=0, le=1, description="sorted: probability that the step trains the full model "
                                                          "(the full width and heads, every depth) as one of its K")
    sub_loss: Literal["mean", "sum"] = Field("mean", description="the full model's loss plus the mean (or sum) of the "
                                                                 "step's sub-model losses")
    distill_weight: float = Field(0.0, ge=0, le=1, description="share of the sub-model loss that is KL to the full "
                                                               "model's logits (in steps that train the full model)")
    temperature: float = Field(1.0, gt=0, description="distillation temperature")
    density_weight: float = Field(0.0, ge=0, description="DEFT activation-density loss on the sub-models (0: off)")
    eps: float = Field(1e-3, gt=0, description="epsilon of a^2/(a^2+eps)")
    only: str | None = Field(None, description="train this one grid point alone (a reference run; e.g. 'l3-w0.5-h6')")
    # evaluation
    eval_rows: int | None = Field(None, ge=10, description="cap on validation/test rows for the per-sub-model tables")
    latency_batch: int = Field(32, ge=1, le=4096, description="rows per timed batch")
    latency_repeats: int = Field(3, ge=1, le=100)
    labels: list[str] | None = Field(None, description="class names in order; None: sorted labels of the data")

    @field_validator("widths")
    @classmethod
    def _widths(cls, v):
        if v is not None and (not v or any(not 0 < w <= 1 for w in v)):
            raise ValueError("width fractions must be in (0, 1]")
        return v

    @field_validator("layers", "heads")
    @classmethod
    def _positive(cls, v):
        if v is not None and (not v or any(x < 1 for x in v)):
            raise ValueError("needs positive integers")
        return v

    @field_validator("grid")
    @classmethod
    def _grid(cls, v):
        if v is not None:
            parts = v.lower().split("x")
            if not 2 <= len(parts) <= 3 or not all(p.isdigit() and int(p) >= 1 for p in parts):
                raise ValueError("grid is 'DxWxH' (encoder) or 'DxW' (mlp) with positive integers, e.g. 6x8x4")
        return v


# ---------------------------------------------------------------------------------------------------
# sub-model specs and the grid


def spec_name(spec: dict) -> str:
    """``l3-w0.5-h6`` (encoder) or ``l3-w0.5`` (MLP)."""
    name = f"l{spec['layers']}-w{spec['width']:g}"
    return name + (f"-h{spec['heads']}" if spec.get("heads") is not None else "")


def parse_spec(obj: Any) -> dict:
    """A spec from a dict, a name (``l3-w0.5-h6``) or a tuple ``(layers, width[, heads])``; ValueError if not."""
    if isinstance(obj, dict):
        unknown = set(obj) - {"layers", "width", "heads", "name"}
        if unknown or "layers" not in obj or "width" not in obj:
            raise ValueError(f"a sub-model is {{'layers', 'width'[, 'heads']}}, got keys {sorted(obj)}")
        spec = {"layers": obj["layers"], "width": obj["width"], "heads": obj.get("heads")}
    elif isinstance(obj, str):
        parts = {p[:1]: p[1:] for p in obj.strip().lower().split("-") if p}
        try:
            spec = {"layers": int(parts["l"]), "width": float(parts["w"]),
                    "heads": int(parts["h"]) if "h" in parts else None}
        except (KeyError, ValueError):
            raise ValueError(f"sub-model name {obj!r} is not like 'l3-w0.5-h6' (layers, width fraction, heads)") from None
    elif isinstance(obj, (list, tuple)) and len(obj) in (2, 3):
        spec = {"layers": obj[0], "width": obj[1], "heads": obj[2] if len(obj) == 3 else None}
    else:
        raise ValueError(f"a sub-model is a dict, a name like 'l3-w0.5-h6' or (layers, width[, heads]); got {obj!r}")
    try:
        spec = {"layers": int(spec["layers"]), "width": float(spec["width"]),
                "heads": None if spec["heads"] is None else int(spec["heads"])}
    except (TypeError, ValueError):
        raise ValueError(f"sub-model {obj!r}: layers and heads must be integers, width a number") from None
    return spec


def _even(n: int, top: int) -> list[int]:
    return sorted({max(1, round(top * j / n)) for j in range(1, n + 1)})


def make_grid(config: SortedNetConfig, n_layers: int, n_heads: int | None) -> list[dict]:
    """The sorted grid of sub-models (full model last); ConfigError for points outside the model."""
    parts = [int(p) for p in config.grid.lower().split("x")] if config.grid else None
    if parts and n_heads is None and len(parts) != 2:
        raise ConfigError(f"grid {config.grid!r}: an MLP grid is 'DxW' (depths x widths)")
    if parts and n_heads is not None and len(parts) != 3:
        raise ConfigError(f"grid {config.grid!r}: an encoder grid is 'DxWxH' (depths x widths x head counts)")
    layers = config.layers or (_even(parts[0], n_layers) if parts else list(range(1, n_layers + 1)))
    widths = config.widths or [j / (parts[1] if parts else (8 if n_heads else 32))
                               for j in range(1, (parts[1] if parts else (8 if n_heads else 32)) + 1)]
    bad = [x for x in layers if x > n_layers]
    if bad:
        raise ConfigError(f"grid depths {bad} exceed the model's {n_layers} layers")
    if parts and parts[0] > n_layers:
        raise ConfigError(f"grid {config.grid!r} asks for {parts[0]} depths but the model has {n_layers} layers")
    if n_heads is None:
        heads: list[int | None] = [None]
        if config.heads:
            raise ConfigError("heads: an MLP has no attention heads; drop heads")
    else:
        heads = config.heads or (_even(parts[2], n_heads) if parts else _even(min(4, n_heads), n_heads))
        if max(heads) > n_heads:
            raise ConfigError(f"grid head counts {[h for h in heads if h > n_heads]} exceed the model's {n_heads} heads")
    layers, widths = sorted(set(layers)), sorted({round(w, 6) for w in widths})
    if layers[-1] != n_layers or widths[-1] != 1.0 or (n_heads is not None and max(heads) != n_heads):
        raise ConfigError("the grid must include the full model (all layers, width 1, all heads)")
    return [{"layers": l, "width": w, "heads": h} for l in layers for w in widths for h in sorted(set(heads), key=lambda x: x or 0)]


# ---------------------------------------------------------------------------------------------------
# building blocks


class SlicedLinear(nn.Linear):
    """``nn.Linear`` whose forward may use only its first ``out_k`` outputs and ``in_k`` inputs.

    y = x[..., :in_k] W[:out_k, :in_k]ᵀ + b[:out_k]: a view of the weight, never a copy, taken inside
    this module's forward so that DeepSpeed ZeRO-3 has gathered the parameter.
    """

    def forward(self, x: torch.Tensor, out_k: int | None = None, in_k: int | None = None) -> torch.Tensor:
        w, b = self.weight, self.bias
        if out_k is not None and out_k < w.shape[0]:
            w = w[:out_k]
            b = b[:out_k] if b is not None else None
        if in_k is not None and in_k < w.shape[1]:
            w = w[:, :in_k]
        return F.linear(x, w, b)


def _density_term(a: torch.Tensor, mask: torch.Tensor | None, eps: float) -> torch.Tensor:
    """DEFT's a²/(a²+ε), mean over (non-padding) positions and features."""
    a2 = a.float().square()
    d = a2 / (a2 + eps)
    if mask is None:
        return d.mean()
    m = mask.unsqueeze(-1)
    return (d * m).sum() / (m.sum() * a.shape[-1]).clamp_min(1)


def _shared_head(head: SlicedLinear, drop: nn.Module, exits: list[tuple[int, torch.Tensor]],
                 in_k: int | None = None) -> dict[int, torch.Tensor]:
    """The shared head on every exit ``(depth, features)`` in one call (one matmul for all depths)."""
    if len(exits) == 1:
        return {exits[0][0]: head(drop(exits[0][1]), in_k=in_k).float()}
    logits = head(drop(torch.stack([e for _, e in exits])), in_k=in_k).float()
    return {d: logits[j] for j, (d, _) in enumerate(exits)}


class NestedModule(nn.Module):
    """What both nested classifiers share: the grid, widths in units, the forward over several specs."""

    input_kind: str = "rows"
    n_layers: int
    n_heads: int | None
    intermediate: int

    def setup_grid(self, config: SortedNetConfig, grid: list[dict] | None) -> None:
        self.config = config
        self.grid = grid if grid is not None else make_grid(config, self.n_layers, self.n_heads)
        self.full = {"layers": self.n_layers, "width": 1.0, "heads": self.n_heads}
        self.density_on = config.density_weight > 0

    def units(self, spec: dict) -> tuple[int, int, int | None]:
        """(layers, MLP units k, heads) of a spec, checked against the model."""
        l, w, h = spec["layers"], spec["width"], spec.get("heads")
        if not 1 <= l <= self.n_layers:
            raise ValueError(f"layers {l} outside 1..{self.n_layers}")
        if not 0 < w <= 1:
            raise ValueError(f"width {w} outside (0, 1]")
        if self.n_heads is None:
            if h is not None:
                raise ValueError("this model has no attention heads; drop heads from the sub-model")
        elif h is None:
            h = self.n_heads
        elif not 1 <= h <= self.n_heads:
            raise ValueError(f"heads {h} outside 1..{self.n_heads}")
        return l, max(1, round(w * self.intermediate)), h

    def forward(self, inputs: dict, specs: list[dict]) -> list[dict]:
        """One output per spec: ``{"logits": (B, C)}`` (+ ``"density_loss"`` when the density loss is on).

        A spec with ``"depths": [l1, l2, ...]`` (each <= its ``layers``) runs its layers once and also
        returns ``"depth_logits": {l: (B, C)}``, the logits of every listed depth at the spec's width and
        heads (the depths share their layers; each extra depth costs one pooling and one head call)."""
        state = self.embed(inputs)
        outs = []
        for spec in specs:
            l, k, h = self.units(spec)
            depths = set(spec.get("depths") or ()) | {l}
            if max(depths) > l or min(depths) < 1:
                raise ValueError(f"depths {sorted(depths)} outside 1..{l}")
            res = self.run(state, k, h, depths)
            out = {"logits": res["logits"][l]}
            if spec.get("depths"):
                out["depth_logits"] = res["logits"]
            if "density" in res:
                out["density_loss"] = res["density"]
            outs.append(out)
        return outs

    @torch.no_grad()
    def depth_logits(self, inputs: dict, width: float, heads: int | None, depths: set[int]) -> dict[int, torch.Tensor]:
        """Logits of every depth in ``depths`` at one (width, heads), sharing the layers they have in common."""
        l, k, h = self.units({"layers": max(depths), "width": width, "heads": heads})
        return self.run(self.embed(inputs), k, h, set(depths), density=False)["logits"]

    def count_params(self, spec: dict) -> dict:
        raise NotImplementedError

    def truncated_state(self, spec: dict) -> tuple[dict, dict[str, torch.Tensor]]:
        raise NotImplementedError


class NestedMLP(NestedModule):
    """An MLP classifier for rows: x → standardise → [SlicedLinear → ReLU] × depth → shared head.

    Sub-model (l, w): the first l hidden layers, each keeping its first k = round(w·H) units.
    """

    input_kind = "rows"

    def __init__(self, config: SortedNetConfig, n_features: int, n_classes: int, *, mean=None, std=None,
                 grid: list[dict] | None = None, arch: dict | None = None) -> None:
        super().__init__()
        arch = arch or {"type": "mlp", "features": n_features, "hidden": config.hidden, "depth": config.depth,
                        "classes": n_classes}
        self.arch = dict(arch)
        self.n_layers, self.n_heads, self.intermediate = arch["depth"], None, arch["hidden"]
        d, hid = arch["features"], arch["hidden"]
        self.register_buffer("mean", torch.zeros(d) if mean is None else torch.as_tensor(mean, dtype=torch.float32))
        self.register_buffer("std", torch.ones(d) if std is None else torch.as_tensor(std, dtype=torch.float32))
        self.inp = SlicedLinear(d, hid)
        self.hidden = nn.ModuleList(SlicedLinear(hid, hid) for _ in range(arch["depth"] - 1))
        self.head = SlicedLinear(hid, arch["classes"])
        self.drop = nn.Dropout(config.dropout or 0.0)
        self.setup_grid(config, grid)

    def embed(self, inputs: dict) -> dict:
        return {"x": (inputs["x"].float() - self.mean) / self.std}

    def run(self, state: dict, k: int, heads, depths: set[int], density: bool | None = None) -> dict:
        density = self.density_on if density is None else density
        h = F.relu(self.inp(state["x"], out_k=k))
        exits, dens = [], []
        if density:
            dens.append(_density_term(h, None, self.config.eps))
        for i in range(1, max(depths) + 1):
            if i > 1:
                h = F.relu(self.hidden[i - 2](self.drop(h), out_k=k, in_k=k))
                if density:
                    dens.append(_density_term(h, None, self.config.eps))
            if i in depths:
                exits.append((i, h))
        out = {"logits": _shared_head(self.head, self.drop, exits, in_k=k)}
        if density:
            out["density"] = torch.stack(dens).mean()
        return out

    def count_params(self, spec: dict) -> dict:
        l, k, _ = self.units(spec)
        d, c = self.arch["features"], self.arch["classes"]
        n = (d * k + k) + (l - 1) * (k * k + k) + (k * c + c)
        return {"params": n, "params_body": n}

    def dummy_input(self) -> dict:
        return {"x": torch.zeros(1, self.arch["features"])}

    def truncated_state(self, spec: dict) -> tuple[dict, dict[str, torch.Tensor]]:
        """The arch and weights of the sub-model ``spec`` as a model of its own (for training it alone)."""
        l, k, _ = self.units(spec)
        sd = self.state_dict()
        out = {"mean": sd["mean"], "std": sd["std"], "inp.weight": sd["inp.weight"][:k], "inp.bias": sd["inp.bias"][:k],
               "head.weight": sd["head.weight"][:, :k], "head.bias": sd["head.bias"]}
        for i in range(l - 1):
            out[f"hidden.{i}.weight"] = sd[f"hidden.{i}.weight"][:k, :k]
            out[f"hidden.{i}.bias"] = sd[f"hidden.{i}.bias"][:k]
        return {**self.arch, "hidden": k, "depth": l}, {n: t.clone() for n, t in out.items()}


class EncoderLayer(nn.Module):
    """A post-LayerNorm BERT layer whose attention keeps its first h heads and its MLP its first k units."""

    def __init__(self, hidden: int, heads: int, head_dim: int, intermediate: int, act: str, ln_eps: float,
                 dropout: float, attn_dropout: float) -> None:
        super().__init__()
        from transformers.activations import ACT2FN

        self.heads, self.head_dim = heads, head_dim
        inner = heads * head_dim
        self.query = SlicedLinear(hidden, inner)
        self.key = SlicedLinear(hidden, inner)
        self.value = SlicedLinear(hidden, inner)
        self.attn_out = SlicedLinear(inner, hidden)
        self.attn_norm = nn.LayerNorm(hidden, eps=ln_eps)
        self.inter = SlicedLinear(hidden, intermediate)
        self.act = ACT2FN[act]
        self.out = SlicedLinear(intermediate, hidden)
        self.out_norm = nn.LayerNorm(hidden, eps=ln_eps)
        self.drop = nn.Dropout(dropout)
        self.attn_drop = nn.Dropout(attn_dropout)

    def forward(self, x: torch.Tensor, bias: torch.Tensor, h: int, k: int):
        b, t, _ = x.shape
        hd = h * self.head_dim

        def split(y):
            return y.view(b, t, h, self.head_dim).transpose(1, 2)

        q, kk, v = split(self.query(x, out_k=hd)), split(self.key(x, out_k=hd)), split(self.value(x, out_k=hd))
        scores = torch.matmul(q, kk.transpose(-1, -2)) / math.sqrt(self.head_dim) + bias
        ctx = torch.matmul(self.attn_drop(scores.softmax(-1)), v).transpose(1, 2).reshape(b, t, hd)
        x = self.attn_norm(x + self.drop(self.attn_out(ctx, in_k=hd)))
        a = self.act(self.inter(x, out_k=k))
        x = self.out_norm(x + self.drop(self.out(a, in_k=k)))
        return x, a


class Embeddings(nn.Module):
    """Word + position + token-type embeddings, LayerNorm, dropout (BERT; RoBERTa-style positions)."""

    def __init__(self, arch: dict, dropout: float) -> None:
        super().__init__()
        self.roberta = arch["positions"] == "roberta"
        self.pad = arch["pad_token_id"]
        self.word = nn.Embedding(arch["vocab"], arch["hidden"])
        self.position = nn.Embedding(arch["max_positions"], arch["hidden"])
        self.token_type = nn.Embedding(max(1, arch["type_vocab"]), arch["hidden"])
        self.norm = nn.LayerNorm(arch["hidden"], eps=arch["ln_eps"])
        self.drop = nn.Dropout(dropout)

    def forward(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        if self.roberta:
            pos = (torch.cumsum(mask, 1) * mask + self.pad).long()
        else:
            pos = torch.arange(ids.shape[1], device=ids.device).unsqueeze(0).expand_as(ids)
        x = self.word(ids) + self.position(pos) + self.token_type(torch.zeros_like(ids))
        return self.drop(self.norm(x))


class NestedEncoder(NestedModule):
    """A BERT-family encoder classifier (mean pooling + linear head) nested along depth, width and heads."""

    input_kind = "text"

    def __init__(self, config: SortedNetConfig, arch: dict, n_classes: int, *, grid: list[dict] | None = None) -> None:
        super().__init__()
        self.arch = {**arch, "classes": n_classes}
        self.n_layers, self.n_heads, self.intermediate = arch["layers"], arch["heads"], arch["intermediate"]
        drop = arch["dropout"] if config.dropout is None else config.dropout
        attn_drop = arch["attn_dropout"] if config.dropout is None else config.dropout
        self.embeddings = Embeddings(arch, drop)
        self.layers = nn.ModuleList(
            EncoderLayer(arch["hidden"], arch["heads"], arch["head_dim"], arch["intermediate"], arch["act"],
                         arch["ln_eps"], drop, attn_drop) for _ in range(arch["layers"]))
        self.head = SlicedLinear(arch["hidden"], n_classes)
        self.head_drop = nn.Dropout(drop)
        nn.init.normal_(self.head.weight, std=0.02)
        nn.init.zeros_(self.head.bias)
        self.setup_grid(config, grid)

    def embed(self, inputs: dict) -> dict:
        ids, mask = inputs["input_ids"], inputs["attention_mask"]
        maskf = mask.float()
        bias = (1.0 - maskf)[:, None, None, :] * torch.finfo(torch.float32).min
        return {"x": self.embeddings(ids, mask.long()), "mask": maskf, "bias": bias}

    def run(self, state: dict, k: int, h: int, depths: set[int], density: bool | None = None) -> dict:
        density = self.density_on if density is None else density
        x, mask, bias = state["x"], state["mask"], state["bias"]
        bias = bias.to(x.dtype)
        exits, dens = [], []
        m = mask.to(x.dtype).unsqueeze(-1)
        for i in range(1, max(depths) + 1):
            x, a = self.layers[i - 1](x, bias, h, k)
            if density:
                dens.append(_density_term(a, mask, self.config.eps))
            if i in depths:
                exits.append((i, (x * m).sum(1) / m.sum(1).clamp_min(1)))
        out = {"logits": _shared_head(self.head, self.head_drop, exits)}
        if density:
            out["density"] = torch.stack(dens).mean()
        return out

    def count_params(self, spec: dict) -> dict:
        l, k, h = self.units(spec)
        a = self.arch
        hid, hd = a["hidden"], h * a["head_dim"]
        emb = (a["vocab"] + a["max_positions"] + max(1, a["type_vocab"])) * hid + 2 * hid
        layer = 3 * (hid * hd + hd) + (hd * hid + hid) + (hid * k + k) + (k * hid + hid) + 4 * hid
        head = hid * a["classes"] + a["classes"]
        return {"params": emb + l * layer + head, "params_body": l * layer + head}

    def dummy_input(self) -> dict:
        t = self.config.max_length
        return {"input_ids": torch.ones(1, t, dtype=torch.long), "attention_mask": torch.ones(1, t, dtype=torch.long)}

    def truncated_state(self, spec: dict) -> tuple[dict, dict[str, torch.Tensor]]:
        """The arch and weights of the sub-model ``spec`` as an encoder of its own (l layers, k units, h heads)."""
        l, k, h = self.units(spec)
        hd = h * self.arch["head_dim"]
        out = {}
        for n, t in self.state_dict().items():
            if n.startswith("layers."):
                i = int(n.split(".")[1])
                if i >= l:
                    continue
                part = n.split(".")[2]
                if part in ("query", "key", "value"):
                    t = t[:hd]
                elif part == "attn_out" and n.endswith("weight"):
                    t = t[:, :hd]
                elif part == "inter":
                    t = t[:k]
                elif part == "out" and n.endswith("weight"):
                    t = t[:, :k]
            out[n] = t.clone()
        arch = {k2: v for k2, v in self.arch.items() if k2 != "classes"}
        return {**arch, "layers": l, "heads": h, "intermediate": k}, out


# ---------------------------------------------------------------------------------------------------
# encoders from transformers checkpoints


def encoder_arch(hf_config) -> dict:
    """The dimensions of a BERT-family transformers config; ConfigError for other architectures."""
    mt = getattr(hf_config, "model_type", "?")
    if mt not in ENCODER_TYPES:
        raise ConfigError(f"model type {mt!r} is not a BERT-family encoder SortedNet can nest "
                          f"({', '.join(ENCODER_TYPES)})")
    hidden, heads = hf_config.hidden_size, hf_config.num_attention_heads
    if getattr(hf_config, "embedding_size", hidden) != hidden:
        raise ConfigError(f"{mt} with embedding_size != hidden_size is not supported")
    if getattr(hf_config, "position_embedding_type", "absolute") not in ("absolute", None):
        raise ConfigError(f"position_embedding_type {hf_config.position_embedding_type!r} is not supported (absolute only)")
    act = hf_config.hidden_act if isinstance(hf_config.hidden_act, str) else "gelu"
    return {"type": "encoder", "model_type": mt, "vocab": hf_config.vocab_size, "hidden": hidden,
            "layers": hf_config.num_hidden_layers, "heads": heads, "head_dim": hidden // heads,
            "intermediate": hf_config.intermediate_size, "act": act, "ln_eps": float(hf_config.layer_norm_eps),
            "max_positions": hf_config.max_position_embeddings, "type_vocab": getattr(hf_config, "type_vocab_size", 1),
            "pad_token_id": getattr(hf_config, "pad_token_id", 0) or 0,
            "positions": "roberta" if mt in ("roberta", "xlm-roberta", "camembert") else "bert",
            "dropout": float(getattr(hf_config, "hidden_dropout_prob", 0.1)),
            "attn_dropout": float(getattr(hf_config, "attention_probs_dropout_prob", 0.1))}


_HF_NAMES = {"attention.self.query": "query", "attention.self.key": "key", "attention.self.value": "value",
             "attention.output.dense": "attn_out", "attention.output.LayerNorm": "attn_norm",
             "intermediate.dense": "inter", "output.dense": "out", "output.LayerNorm": "out_norm"}
_HF_EMB = {"word_embeddings": "word", "position_embeddings": "position", "token_type_embeddings": "token_type",
           "LayerNorm": "norm"}


def hf_to_nested(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rename a transformers BERT-family encoder state dict (``[prefix.]embeddings.*``, ``encoder.layer.i.*``)."""
    out = {}
    for name, t in state.items():
        parts = name.split(".")
        if "embeddings" in parts:
            i = parts.index("embeddings")
            if i + 2 < len(parts) + 1 and parts[i + 1] in _HF_EMB:
                out[f"embeddings.{_HF_EMB[parts[i + 1]]}.{parts[-1]}"] = t
        elif "layer" in parts and "encoder" in parts:
            i = parts.index("layer")
            idx, rest = parts[i + 1], ".".join(parts[i + 2:-1])
            if rest in _HF_NAMES:
                out[f"layers.{idx}.{_HF_NAMES[rest]}.{parts[-1]}"] = t
    return out


def load_pretrained(path: str) -> tuple[Any, dict[str, torch.Tensor]]:
    """The transformers config and the renamed encoder weights of a BERT-family checkpoint."""
    from transformers import AutoModel

    from densiray.models.deft import _one_line, _quiet_transformers, load_hf_config

    hf_config = load_hf_config(path)
    encoder_arch(hf_config)
    try:
        with _quiet_transformers():
            base = AutoModel.from_pretrained(path, dtype=torch.float32)
    except Exception as e:
        raise ConfigError(f"cannot load the weights of {path!r} ({_one_line(e)})") from e
    return hf_config, hf_to_nested(base.state_dict())


@torch.no_grad()
def reorder_by_magnitude(module: NestedEncoder) -> None:
    """Sort each layer's heads and MLP neurons by a weight-magnitude importance, most important first.

    Head j: ‖W_o[:, j·d:(j+1)·d]‖_F · ‖W_v[j·d:(j+1)·d]‖_F; neuron i: ‖W_in[i]‖₂ · ‖W_out[:, i]‖₂.
    A permutation of heads (q, k, v rows and W_o columns together) or of neurons (W_in rows, b_in,
    W_out columns) leaves the full model's output unchanged.
    """
    d = module.arch["head_dim"]
    for layer in module.layers:
        H = layer.heads
        imp = torch.stack([layer.attn_out.weight[:, j * d:(j + 1) * d].norm() * layer.value.weight[j * d:(j + 1) * d].norm()
                           for j in range(H)])
        order = torch.argsort(imp, descending=True, stable=True)
        rows = torch.cat([torch.arange(j * d, (j + 1) * d) for j in order.tolist()])
        for lin in (layer.query, layer.key, layer.value):
            lin.weight.copy_(lin.weight[rows])
            lin.bias.copy_(lin.bias[rows])
        layer.attn_out.weight.copy_(layer.attn_out.weight[:, rows])
        imp = layer.inter.weight.norm(dim=1) * layer.out.weight.norm(dim=0)
        order = torch.argsort(imp, descending=True, stable=True)
        layer.inter.weight.copy_(layer.inter.weight[order])
        layer.inter.bias.copy_(layer.inter.bias[order])
        layer.out.weight.copy_(layer.out.weight[:, order])


def build_encoder(config: SortedNetConfig, path: str, n_classes: int, *, pretrained: bool = True,
                  arch: dict | None = None, grid: list[dict] | None = None) -> NestedEncoder:
    """A nested encoder: from ``path``'s pretrained weights (re-ordered if asked), or empty from ``arch``."""
    if pretrained:
        hf_config, weights = load_pretrained(path)
        module = NestedEncoder(config, arch or encoder_arch(hf_config), n_classes, grid=grid)
        missing, _ = module.load_state_dict(weights, strict=False)
        body = [m for m in missing if not m.startswith("head.")]
        if body:
            raise ConfigError(f"the checkpoint {path!r} lacks encoder weights {body[:3]}")
        if config.reorder == "magnitude":
            reorder_by_magnitude(module)
        return module
    return NestedEncoder(config, arch, n_classes, grid=grid)


# ---------------------------------------------------------------------------------------------------
# measuring the sub-models


def flops_of(module: NestedModule, spec: dict) -> int:
    """Floating-point operations of one example through ``spec`` (``torch.utils.flop_counter``; text at max_length)."""
    from torch.utils.flop_counter import FlopCounterMode

    was = module.training
    module.eval()
    try:
        with torch.no_grad(), FlopCounterMode(display=False) as counter:
            module(module.dummy_input(), [spec])
    finally:
        module.train(was)
    return int(counter.get_total_flops())


@torch.no_grad()
def latency_ms(module: NestedModule, batch: dict, spec: dict, repeats: int) -> float:
    """Median wall time of one forward of ``batch`` through ``spec``, in milliseconds (after one warm-up)."""
    module.eval()
    module(batch, [spec])
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        module(batch, [spec])
        times.append((time.perf_counter() - t0) * 1000)
    return float(statistics.median(times))


@torch.no_grad()
def grid_accuracy(module: NestedModule, batches: list[dict], grid: list[dict]) -> dict[str, float]:
    """Accuracy of every grid point over ``batches`` (dicts with ``labels``); depths share their layers."""
    module.eval()
    groups: dict[tuple, set[int]] = {}
    for s in grid:
        groups.setdefault((s["width"], s.get("heads")), set()).add(s["layers"])
    correct = {spec_name(s): 0 for s in grid}
    total = 0
    for batch in batches:
        y = batch["labels"]
        inputs = {k: v for k, v in batch.items() if k != "labels"}
        total += len(y)
        for (w, h), depths in groups.items():
            for l, logits in module.depth_logits(inputs, w, h, depths).items():
                correct[spec_name({"layers": l, "width": w, "heads": h})] += int((logits.argmax(1) == y).sum())
    return {k: v / max(total, 1) for k, v in correct.items()}


def pick_for_budget(rows: list[dict], **budget: float) -> dict:
    """The row (sub-model with metrics) of highest validation accuracy whose flops / latency_ms / params
    all fit the budget (ties: fewer FLOPs); :class:`BudgetError` when none fits, DataError for a bad budget."""
    if not budget:
        raise DataError(f"a budget needs at least one of {', '.join(BUDGET_KEYS)}")
    unknown = sorted(set(budget) - set(BUDGET_KEYS))
    if unknown:
        raise DataError(f"unknown budget {unknown[0]!r}; use {', '.join(BUDGET_KEYS)}")
    for k, v in budget.items():
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v <= 0:
            raise DataError(f"budget {k} must be a positive number, got {v!r}")
    fits = [r for r in rows if all(r[k] <= v for k, v in budget.items())]
    if not fits:
        smallest = {k: min(r[k] for r in rows) for k in budget}
        need = ", ".join(f"{k} >= {smallest[k]:.4g}" for k in budget)
        raise BudgetError(f"no sub-model fits the budget {', '.join(f'{k}={v:g}' for k, v in budget.items())}; "
                          f"the smallest needs {need}")
    return max(fits, key=lambda r: (r.get("val_accuracy", r.get("test_accuracy", 0.0)), -r["flops"]))


# ---------------------------------------------------------------------------------------------------
# the loaded model


class NestedClassifier:
    """An exported SortedNet model (no Ray): every sub-model of one set of weights.

    ``predict(items, budget=None)`` classifies texts (encoder) or rows (MLP) with the full model, or with
    the sub-model a budget picks (``{"flops": ...}``, ``{"latency_ms": ...}``, ``{"params": ...}``, or
    ``{"submodel": "l3-w0.5-h6"}``) -> ``{"labels", "probs", "submodel": {...}}``. ``submodels()`` lists
    the grid with each point's measured metrics, ``submodel(spec)`` restricts to one point,
    ``for_budget(**budget)`` picks the most accurate that fits, from the manifest, without search.
    """

    kind = "sortednet"
    max_batch = 64

    def __init__(self, module: NestedModule, manifest: dict, name: str, tokenizer=None, *, spec: dict | None = None,
                 rows: list[dict] | None = None, lock: threading.Lock | None = None) -> None:
        self.module = module.eval()
        self.manifest = manifest
        self.name = name
        self.tokenizer = tokenizer
        self.labels = list(manifest["config"]["labels"])
        self.input_kind = module.input_kind
        self.dim = module.arch["features"] if self.input_kind == "rows" else None  # features per row
        self._rows = rows if rows is not None else list(manifest.get("metrics", {}).get("submodels", []))
        self._by_name = {r["name"]: r for r in self._rows}
        self.spec = spec  # None: the full model, any budget allowed
        all_metrics = manifest.get("metrics", {})
        self.metrics = ({k: v for k, v in all_metrics.items() if k != "submodels"} if spec is None
                        else dict(self._by_name.get(spec_name(spec), {})))
        self._lock = lock or threading.Lock()

    def __repr__(self) -> str:
        which = "all sub-models" if self.spec is None else spec_name(self.spec)
        return f"NestedClassifier(name={self.name!r}, kind='sortednet', input={self.input_kind}, {which}, labels={self.labels})"

    # -- Nested -------------------------------------------------------------------------------------

    def submodels(self) -> list[dict]:
        """Every grid point: ``name``, ``layers``, ``width``, ``heads`` and its metrics."""
        return [dict(r) for r in self._rows]

    def _row(self, spec: Any) -> dict:
        try:
            s = parse_spec(spec)
        except ValueError as e:
            raise DataError(str(e)) from None
        if s["heads"] is None and self.module.n_heads is not None:
            s["heads"] = self.module.n_heads
        row = self._by_name.get(spec_name(s))
        if row is None:
            raise DataError(f"sub-model {spec_name(s)!r} is not on this model's grid of {len(self._rows)} "
                             f"(e.g. {self._rows[0]['name']!r} .. {self._rows[-1]['name']!r})")
        return row

    def submodel(self, spec: Any) -> NestedClassifier:
        """The model restricted to one grid point (same ``predict``; shares the weights)."""
        row = self._row(spec)
        return NestedClassifier(self.module, self.manifest, self.name, self.tokenizer, rows=self._rows,
                                spec={k: row[k] for k in ("layers", "width", "heads")}, lock=self._lock)

    def for_budget(self, **budget: float) -> NestedClassifier:
        """The most accurate sub-model (by validation accuracy) within ``flops`` / ``latency_ms`` / ``params``."""
        return self.submodel(pick_for_budget(self._rows, **budget)["name"])

    # -- Classifier -------------------------------------------------------------------------------

    def _resolve_budget(self, budget) -> dict:
        if budget is None:
            return self.spec or self.module.full
        if isinstance(budget, dict) and set(budget) == {"submodel"}:
            return self.submodel(budget["submodel"]).spec
        if isinstance(budget, dict):
            return self.for_budget(**budget).spec
        return self.submodel(budget).spec

    def _encode(self, items: list) -> list[dict]:
        rows_array = self.input_kind == "rows" and isinstance(items, np.ndarray)
        if not rows_array and (isinstance(items, (str, bytes)) or not isinstance(items, (list, tuple))):
            raise DataError(f"items must be a list, got {type(items).__name__}")
        batches = []
        if self.input_kind == "text":
            from densiray.models.deft import tokenize

            bad = [i for i, t in enumerate(items) if not isinstance(t, str)]
            if bad:
                raise DataError(f"texts[{bad[0]}] is a {type(items[bad[0]]).__name__}, not a string")
            for i in range(0, len(items), self.max_batch):
                batches.append(tokenize(self.tokenizer, list(items[i:i + self.max_batch]), self.module.config.max_length))
            return batches
        d = self.module.arch["features"]
        try:
            x = (torch.as_tensor(np.asarray(items, dtype=np.float32)) if rows_array
                 else torch.as_tensor([[float(v) for v in row] for row in items], dtype=torch.float32) if len(items)
                 else torch.zeros(0, d))
        except (TypeError, ValueError):
            raise DataError(f"rows must be lists of {d} numbers") from None
        if x.ndim != 2 or x.shape[1] != d:
            raise DataError(f"rows must have {d} features, got shape {tuple(x.shape)}")
        if not torch.isfinite(x).all():
            raise DataError("rows contain NaN or infinite values")
        return [{"x": x[i:i + self.max_batch]} for i in range(0, len(x), self.max_batch)]

    @torch.no_grad()
    def predict(self, items: list, budget: Any = None) -> dict:
        spec = self._resolve_budget(budget)
        row = self._by_name.get(spec_name(spec), {"name": spec_name(spec), **spec})
        labels, probs = [], []
        with self._lock:
            for batch in self._encode(items):
                logits = self.module(batch, [spec])[0]["logits"]
                p = logits.float().softmax(-1).double()
                p = p / p.sum(1, keepdim=True)
                labels += [self.labels[j] for j in p.argmax(1).tolist()]
                probs += p.tolist()
        return {"labels": labels, "probs": probs, "submodel": dict(row)}


def module_from_config(config: dict, tensors: dict[str, torch.Tensor] | None = None) -> NestedModule:
    """Rebuild a nested module from an exported config (``model``, ``arch``, ``labels``, ``grid``) and weights."""
    cfg = SortedNetConfig(**(config.get("model") or {}))
    arch, labels, grid = config["arch"], config["labels"], config.get("grid")
    if arch["type"] == "mlp":
        module: NestedModule = NestedMLP(cfg, arch["features"], len(labels), arch=arch, grid=grid)
    else:
        module = NestedEncoder(cfg, arch, len(labels), grid=grid)
    if tensors is not None:
        module.load_state_dict(tensors, strict=True)
    return module.eval()


def load_exported(stored) -> NestedClassifier:
    """A :class:`NestedClassifier` from an exported SortedNet model (``stored``: a verified StoredModel)."""
    from densiray.errors import StoreError

    config = stored.manifest.get("config") or {}
    try:
        module = module_from_config(config, stored.tensors)
    except (KeyError, TypeError, RuntimeError, ValueError) as e:
        raise StoreError(f"model {stored.name!r}: stored weights or config do not fit a SortedNet model "
                         f"({' '.join(str(e).split())[:200]}); export it again") from e
    tokenizer = None
    if module.input_kind == "text":
        from densiray.models.deft import load_tokenizer, resolve_model

        path = resolve_model(module.config.model)
        if not os.path.exists(path) and (os.path.isabs(path) or path.startswith(".")):
            raise StoreError(f"model {stored.name!r} needs the tokenizer of {module.config.model!r}, which is not on "
                             "this machine; copy that model folder there")
        try:
            tokenizer = load_tokenizer(path)
        except ConfigError as e:
            raise StoreError(f"model {stored.name!r}: {e}") from e
    return NestedClassifier(module, stored.manifest, stored.name, tokenizer)
