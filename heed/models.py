"""Tokenizers and causal language models: train, build from presets, save, load; batching.

Any local Hugging Face causal-LM directory is accepted wherever a model is
(`load_policy(path)`): nothing is fetched from a hub.

Batch layout used by every stage (the TRL layout): prompts left-padded,
responses right-padded, concatenated: `[pad pad p p p | r r r EOS pad]`.
Position ids are `cumsum(attention_mask) - 1`, so a left-padded prompt gets the
same positions as an unpadded one (Huang et al. 2023, "N implementation details").
Attention masks, never token ids, say what is padding: a tokenizer whose pad token is its
EOS (or that has none, and gets EOS as pad) works as well as heed's own, and the EOS that
ends a response is scored and trained like any response token.

Prompts are rendered with heed's template (heed/template.py) for heed's own tokenizers, and
with the tokenizer's own chat template (`apply_chat_template`) for any other tokenizer that
has one (`render_prompt`).

LoRA (peft): `add_lora` wraps a model in a peft adapter; every forward here runs the
transformers model inside (`unwrap`: the LoRA layers are in it), so a peft policy and a plain
one take the same paths, and `Reference` gives the policy with its adapter switched off as
the reference model. A directory holding an adapter loads as its base with the adapter merged.
"""

from __future__ import annotations

import copy
import json
import sys
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import torch
import torch.nn.functional as F

from heed.template import CHAT_TEMPLATE, EOS_TOKEN, PAD_TOKEN, format_prompt
from heed.utils import HeedError

# Model presets sized for a 2-core CPU. `tiny` trains in a minute or two; `small`
# is the same family at about 12M parameters.
PRESETS: dict[str, dict] = {
    "tiny": dict(hidden_size=128, intermediate_size=384, num_hidden_layers=4, num_attention_heads=4,
                 vocab_size=1024, max_position_embeddings=256),
    "small": dict(hidden_size=384, intermediate_size=1024, num_hidden_layers=6, num_attention_heads=6,
                  vocab_size=4096, max_position_embeddings=512),
}


# ---------------------------------------------------------------------------
# Tokenizer
# ---------------------------------------------------------------------------

def train_tokenizer(texts: Sequence[str], vocab_size: int, out_dir: str | Path | None = None):
    """Byte-level BPE (GPT-2 style) trained on `texts`, wrapped as a HF fast tokenizer.

    PAD is its own token, distinct from EOS, so masks never hide a real end of text.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[PAD_TOKEN, EOS_TOKEN],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(texts, trainer=trainer)
    hf = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=EOS_TOKEN, pad_token=PAD_TOKEN,
                                 bos_token=None, padding_side="left")
    hf.chat_template = CHAT_TEMPLATE
    if out_dir is not None:
        hf.save_pretrained(out_dir)
    return hf


def load_tokenizer(path: str | Path):
    """A local tokenizer, left-padding. One without a pad token pads with EOS: no token is added
    (which would resize a real model's embeddings), and attention masks say what is padding
    everywhere in heed, so the EOS that ends a response still counts."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(path))
    if tok.eos_token_id is None:
        raise HeedError(f"{path}: tokenizer has no EOS token")
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    tok.padding_side = "left"
    return tok


def uses_heed_template(tokenizer) -> bool:
    """Whether prompts are rendered with heed's template: heed's own tokenizers (whose chat
    template is heed's) and tokenizers with no chat template; any other chat template is used."""
    template = getattr(tokenizer, "chat_template", None)
    return not template or template == CHAT_TEMPLATE


def render_prompt(tokenizer, prompt: str | list[dict]) -> str:
    """A prompt (a string, or chat messages, system messages included) as text that ends where
    the response begins: heed's template, or the tokenizer's own chat template with its
    generation prompt (a string is one user message)."""
    if uses_heed_template(tokenizer):
        return format_prompt(prompt)
    messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else list(prompt)
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


# ---------------------------------------------------------------------------
# Models
# ---------------------------------------------------------------------------

def build_model(preset: str, tokenizer):
    """A fresh Llama-architecture causal LM from a named preset, dropout off."""
    from transformers import LlamaConfig, LlamaForCausalLM

    if preset not in PRESETS:
        raise HeedError(f"unknown preset {preset!r} (choose from {', '.join(PRESETS)})")
    p = dict(PRESETS[preset])
    p["vocab_size"] = len(tokenizer)
    config = LlamaConfig(**p, num_key_value_heads=p["num_attention_heads"], tie_word_embeddings=True,
                         attention_dropout=0.0, pad_token_id=tokenizer.pad_token_id,
                         eos_token_id=tokenizer.eos_token_id, bos_token_id=tokenizer.eos_token_id)
    return LlamaForCausalLM(config)


ADAPTER_CONFIG = "adapter_config.json"


def load_policy(path: str | Path, *, dtype: torch.dtype = torch.float32):
    """(model, tokenizer) from a local HF directory; dropout off (eval mode) for RL stability.

    A directory holding a LoRA adapter (a stage run with --lora-r) loads as its base model with
    the adapter merged in: a plain causal LM, as `heed merge` writes it. The base is the
    directory the adapter names (itself a model or another adapter)."""
    from transformers import AutoModelForCausalLM

    path = Path(path).resolve()  # an adapter saved from this model names its base by this path
    if not (path / "config.json").exists() and (path / ADAPTER_CONFIG).exists():
        return load_adapter(path, dtype=dtype)
    if not (path / "config.json").exists():
        raise HeedError(f"{path}: not a model directory (no config.json); train one with `heed pretrain`")
    tokenizer = load_tokenizer(path)
    model = AutoModelForCausalLM.from_pretrained(str(path), dtype=dtype)
    if model.get_input_embeddings().num_embeddings < len(tokenizer):
        model.resize_token_embeddings(len(tokenizer))
    disable_dropout(model)
    fuse_activations(model)
    return model, tokenizer


def load_adapter(path: Path, *, dtype: torch.dtype = torch.float32):
    """(base + LoRA adapter merged, tokenizer) of an adapter directory."""
    from peft import PeftModel

    base_path = json.loads((path / ADAPTER_CONFIG).read_text()).get("base_model_name_or_path")
    if not base_path or not Path(base_path).is_dir():
        raise HeedError(f"{path}: its LoRA adapter's base model {base_path!r} is not a local directory")
    base, _ = load_policy(base_path, dtype=dtype)
    model = PeftModel.from_pretrained(base, str(path)).merge_and_unload()
    model.name_or_path = str(path)  # an adapter trained on top of this one names this directory as its base
    disable_dropout(model)
    return model, load_tokenizer(path)


# ---------------------------------------------------------------------------
# LoRA (peft)
# ---------------------------------------------------------------------------

# What LoRA adapts by default, by `config.model_type`: every attention and MLP projection.
LORA_TARGETS: dict[str, list[str]] = {
    **{kind: ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
       for kind in ("llama", "mistral", "mixtral", "qwen2", "qwen3", "gemma", "gemma2", "olmo", "olmo2")},
    "gpt2": ["c_attn", "c_proj", "c_fc"],
}


def lora_targets(config) -> list[str] | str:
    """The default LoRA target modules of a model's architecture, else peft's "all-linear"
    (every linear layer but the output head)."""
    return LORA_TARGETS.get(getattr(config, "model_type", ""), "all-linear")


def add_lora(model, *, r: int, alpha: float, dropout: float = 0.0, targets: Sequence[str] = ()):
    """`model` wrapped in a fresh LoRA adapter (peft): its own weights frozen, the adapter's
    B = 0, so the wrapped model starts as the model. Adapter weights are fp32 whatever the
    model's dtype (peft's autocast_adapter_dtype)."""
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout, bias="none",
                        target_modules=list(targets) if targets else lora_targets(model.config))
    return get_peft_model(model, config)


def is_peft(model) -> bool:
    """Whether `model` is a peft wrapper (peft is imported only when LoRA is used)."""
    peft = sys.modules.get("peft")
    return peft is not None and isinstance(model, peft.PeftModel)


def unwrap(model):
    """The transformers model inside a peft wrapper (its LoRA layers in place, so running it
    runs the adapter too), or `model` itself."""
    return model.get_base_model() if is_peft(model) else model


def trunk_of(model):
    """The transformer trunk of a causal LM (its `base_model`: hidden states, no LM head),
    through a peft wrapper; a trunk is its own trunk."""
    return unwrap(model).base_model


def merged(model):
    """A plain transformers model: `model` with its LoRA adapter folded into the weights (peft's
    merge_and_unload; the wrapper is spent afterwards), or `model` itself."""
    return model.merge_and_unload() if is_peft(model) else model


class Reference:
    """The frozen model KL penalties and DPO's log-ratios are measured against.

    - `model` or `path` given: that model (loaded from `path`), frozen;
    - a policy with a LoRA adapter: the policy itself with its adapter switched off (peft's
      `disable_adapter`): one copy of the base weights in memory, as in TRL and OpenRLHF;
    - otherwise a frozen copy of the policy as it is now (`snapshot`), or, without
      `snapshot`, the policy itself (for a reference used only before training starts).

        with reference() as ref:
            ref_logprobs = token_logprobs(ref, batch)
    """

    def __init__(self, policy, path: str | Path | None = None, *, model=None, snapshot: bool = True, dtype=None):
        self.policy, self.model = policy, model
        if model is not None:
            pass
        elif path:
            self.model = load_policy(path, dtype=dtype or next(policy.parameters()).dtype)[0]
        elif not is_peft(policy):
            self.model = copy.deepcopy(policy) if snapshot else policy
        if self.model is not None and self.model is not policy:
            self.model.eval().requires_grad_(False)

    @property
    def adapter_off(self) -> bool:
        """Whether the reference is the policy with its adapter switched off."""
        return self.model is None

    def to(self, device) -> "Reference":
        if self.model is not None and self.model is not self.policy:
            self.model.to(device)
        return self

    @contextmanager
    def __call__(self):
        if self.model is not None:
            yield self.model
            return
        was_training = self.policy.training
        self.policy.eval()
        try:
            with self.policy.disable_adapter():
                yield unwrap(self.policy)
        finally:
            self.policy.train(was_training)


def fuse_activations(model: torch.nn.Module) -> None:
    """Swap transformers' `NewGELUActivation` ("gelu_new": GPT-2 and its kin) for the same
    function in one fused kernel, `F.gelu(x, approximate="tanh")`. The Python version is six
    elementwise operations whose outputs autograd keeps for the backward pass; the fused one
    keeps its input only. Equal to float rounding; the config (and so a saved model) is unchanged.
    On a GPT-2-style 5M model it took a quarter off the peak memory of reward-model training
    and a third off DPO's (docs/performance.md)."""
    from transformers.activations import GELUTanh, NewGELUActivation

    for module in list(model.modules()):
        for name, child in module.named_children():
            if type(child) is NewGELUActivation:
                setattr(module, name, GELUTanh())


def disable_dropout(model: torch.nn.Module) -> None:
    """Dropout makes log-probs of the same tokens differ between passes; RLHF turns it off:
    dropout modules, the functional rates attention layers keep (Llama's `attention_dropout`),
    and the config's rates, so a saved model stays without it."""
    for m in model.modules():
        if isinstance(m, torch.nn.Dropout):
            m.p = 0.0
        for name in ("attention_dropout", "dropout"):
            if isinstance(getattr(m, name, None), float):
                setattr(m, name, 0.0)
    config = getattr(model, "config", None)
    if config is not None:
        for key, value in config.to_dict().items():
            if "dropout" in key and isinstance(value, float):
                setattr(config, key, 0.0)


def save_model(model, tokenizer, out_dir: str | Path, **extra_json) -> None:
    """A model directory: the weights (a peft model: its adapter only, in peft's format, naming
    its base directory; `load_policy` and `heed merge` fold it in), the tokenizer, heed.json."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    if extra_json:
        (out_dir / "heed.json").write_text(json.dumps(extra_json, indent=2))


def device_of(model: torch.nn.Module) -> torch.device:
    """The device a model's (first) parameters live on: where its input batches go."""
    return next(model.parameters()).device


def count_parameters(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


# ---------------------------------------------------------------------------
# Batches: left-padded prompts + right-padded responses
# ---------------------------------------------------------------------------

@dataclass
class Batch:
    input_ids: torch.Tensor       # (B, T)
    attention_mask: torch.Tensor  # (B, T) 1 for real tokens
    response_mask: torch.Tensor   # (B, T) 1 for response tokens (incl. EOS); loss/KL live here
    prompt_len: int               # P: responses start at column P

    def to(self, device) -> "Batch":
        return Batch(self.input_ids.to(device), self.attention_mask.to(device),
                     self.response_mask.to(device), self.prompt_len)

    def share_prompts(self, group_size: int) -> "SharedBatch":
        """The same rows as a SharedBatch, when each run of `group_size` rows shares one prompt."""
        P, B = self.prompt_len, self.input_ids.shape[0]
        return SharedBatch(self.input_ids[::group_size, :P], self.attention_mask[::group_size, :P],
                           torch.full((B // group_size,), group_size, dtype=torch.long, device=self.input_ids.device),
                           self.input_ids[:, P:], self.response_mask[:, P:])


def encode_prompts(tokenizer, prompts: Sequence, max_len: int) -> list[list[int]]:
    """Token ids of each rendered prompt (`render_prompt`); long prompts keep their end (the question)."""
    ids = tokenizer([render_prompt(tokenizer, p) for p in prompts], add_special_tokens=False)["input_ids"]
    return [x[-max_len:] for x in ids]


def encode_responses(tokenizer, responses: Sequence[str], max_len: int, *, add_eos: bool = True) -> list[list[int]]:
    """Token ids of the response (+ EOS), truncated to max_len (truncated ones lose their EOS).
    Under heed's template the response follows "Assistant:" after a space (" " + response); a
    chat template's generation prompt already ends where the response begins."""
    space = " " if uses_heed_template(tokenizer) else ""
    ids = tokenizer([space + r for r in responses], add_special_tokens=False)["input_ids"]
    eos = [tokenizer.eos_token_id] if add_eos else []
    return [(x + eos)[:max_len] for x in ids]


def collate(prompt_ids: list[list[int]], response_ids: list[list[int]], pad_id: int) -> Batch:
    """Left-pad prompts, right-pad responses, concatenate."""
    B = len(prompt_ids)
    P = max(len(p) for p in prompt_ids)
    R = max(1, max(len(r) for r in response_ids))
    input_ids = torch.full((B, P + R), pad_id, dtype=torch.long)
    attention = torch.zeros((B, P + R), dtype=torch.long)
    response_mask = torch.zeros((B, P + R), dtype=torch.long)
    for i, (p, r) in enumerate(zip(prompt_ids, response_ids)):
        input_ids[i, P - len(p):P] = torch.tensor(p, dtype=torch.long)
        attention[i, P - len(p):P] = 1
        if r:
            input_ids[i, P:P + len(r)] = torch.tensor(r, dtype=torch.long)
            attention[i, P:P + len(r)] = 1
            response_mask[i, P:P + len(r)] = 1
    return Batch(input_ids, attention, response_mask, P)


def make_batch(tokenizer, prompts: Sequence, responses: Sequence[str], *, max_prompt_len: int = 128,
               max_response_len: int = 128, add_eos: bool = True) -> Batch:
    return collate(encode_prompts(tokenizer, prompts, max_prompt_len),
                   encode_responses(tokenizer, responses, max_response_len, add_eos=add_eos),
                   tokenizer.pad_token_id)


def position_ids(attention_mask: torch.Tensor) -> torch.Tensor:
    """Positions that ignore left padding: the first real token is position 0."""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


def forward_hidden(model, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Last hidden states (B, T, d) of a causal LM's trunk, with padding-aware positions."""
    out = trunk_of(model)(input_ids=input_ids, attention_mask=attention_mask,
                          position_ids=position_ids(attention_mask), use_cache=False)
    return out.last_hidden_state


@dataclass
class SharedBatch:
    """Responses that share prompts: each prompt once, left-padded (N, P); the responses
    right-padded (M, R), `counts[i]` of them continuing prompt i, in order."""

    prompt_ids: torch.Tensor
    prompt_mask: torch.Tensor
    counts: torch.Tensor          # (N,) responses per prompt, summing to M
    response_ids: torch.Tensor
    response_mask: torch.Tensor

    def to(self, device) -> "SharedBatch":
        return SharedBatch(*(getattr(self, f).to(device) for f in
                             ("prompt_ids", "prompt_mask", "counts", "response_ids", "response_mask")))

    @property
    def owner(self) -> torch.Tensor:
        """(M,) the prompt row of each response."""
        return torch.repeat_interleave(torch.arange(len(self.counts), device=self.counts.device), self.counts)


def shared_width(prompt, responses: Sequence[str]) -> int:
    """The padded work a row of a SharedBatch brings, in characters (no tokenizer needed): its
    prompt, and its responses at the longest one's width. For grouping rows of similar length
    into micro-batches (heed/algos/common.py:micro_batches)."""
    return len(format_prompt(prompt)) + len(responses) * max((len(r) for r in responses), default=0)


def shared_batch(tokenizer, prompts: Sequence, responses: Sequence[Sequence[str]], *, max_prompt_len: int,
                 max_response_len: int, pad_to_multiple_of: int = 1) -> SharedBatch:
    """`responses[i]` are the responses to `prompts[i]` (a pair's two, a ranking's K). With
    `pad_to_multiple_of`, the prompt and response widths are rounded up to a multiple of it:
    fewer distinct shapes, which bf16 on a CPU needs (oneDNN builds kernels per shape)."""
    prompt_ids = encode_prompts(tokenizer, prompts, max_prompt_len)
    flat = [r for group in responses for r in group]
    response_ids = encode_responses(tokenizer, flat, max_response_len)
    P, R = max(len(p) for p in prompt_ids), max(1, max(len(r) for r in response_ids))
    P, R = (-(-n // pad_to_multiple_of) * pad_to_multiple_of for n in (P, R))
    pad = tokenizer.pad_token_id
    prompt = torch.full((len(prompt_ids), P), pad, dtype=torch.long)
    prompt_mask = torch.zeros((len(prompt_ids), P), dtype=torch.long)
    for i, ids in enumerate(prompt_ids):
        prompt[i, P - len(ids):] = torch.tensor(ids, dtype=torch.long)
        prompt_mask[i, P - len(ids):] = 1
    response = torch.full((len(flat), R), pad, dtype=torch.long)
    response_mask = torch.zeros((len(flat), R), dtype=torch.long)
    for j, ids in enumerate(response_ids):
        if ids:
            response[j, :len(ids)] = torch.tensor(ids, dtype=torch.long)
            response_mask[j, :len(ids)] = 1
    counts = torch.tensor([len(group) for group in responses], dtype=torch.long)
    return SharedBatch(prompt, prompt_mask, counts, response, response_mask)


def forward_shared(model, batch: SharedBatch) -> tuple[torch.Tensor, torch.Tensor]:
    """Last hidden states of the prompts (N, P, d) and of the responses (M, R, d), each prompt
    run once: its keys and values are reused, with gradients, by every response continuing it.
    Equal (up to rounding) to running every prompt + response row in full. Under gradient
    checkpointing in training, which cannot keep a cache, every row runs in full instead."""
    trunk = trunk_of(model)
    if trunk.training and trunk.is_activation_checkpointing:
        return forward_shared_in_full(trunk, batch)
    out = trunk(input_ids=batch.prompt_ids, attention_mask=batch.prompt_mask,
                position_ids=position_ids(batch.prompt_mask), use_cache=True)
    owner = batch.owner
    cache = out.past_key_values
    # each response gets its prompt's keys and values; index_select, whose backward is an
    # index_add, not the cache's own `keys[owner]`, whose backward (an accumulating index_put)
    # took 7% of a reward-model step on the CPU
    for layer in cache.layers:
        layer.keys, layer.values = layer.keys.index_select(0, owner), layer.values.index_select(0, owner)
    R = batch.response_ids.shape[1]
    start = batch.prompt_mask.sum(-1)[owner]  # positions continue after the prompt's real tokens
    positions = start[:, None] + torch.arange(R, device=start.device)
    mask = torch.cat([batch.prompt_mask[owner], batch.response_mask], 1)
    responses = trunk(input_ids=batch.response_ids, attention_mask=mask, position_ids=positions,
                      past_key_values=cache, use_cache=True)
    return out.last_hidden_state, responses.last_hidden_state


def forward_shared_in_full(trunk, batch: SharedBatch) -> tuple[torch.Tensor, torch.Tensor]:
    """forward_shared's result with each response's row run in full, its prompt repeated (no
    KV cache): the prompts' hidden states are read off each prompt's first response row."""
    owner, P = batch.owner, batch.prompt_ids.shape[1]
    mask = torch.cat([batch.prompt_mask[owner], batch.response_mask], 1)
    hidden = trunk(input_ids=torch.cat([batch.prompt_ids[owner], batch.response_ids], 1), attention_mask=mask,
                   position_ids=position_ids(mask), use_cache=False).last_hidden_state
    first = torch.cumsum(batch.counts, 0) - batch.counts  # each prompt's first response row
    return hidden[first, :P], hidden[:, P:]


def shared_token_logprobs(model, batch: SharedBatch, *, temperature: float = 1.0) -> torch.Tensor:
    """log pi(y_t | x, y_<t) of every response token, (M, R), 0 on padding; each prompt run once,
    the LM head only where a response token is predicted (the prompt's last position, then the
    response's)."""
    prompt_hidden, response_hidden = forward_shared(model, batch)
    head = unwrap(model).get_output_embeddings()
    hidden = torch.cat([prompt_hidden[batch.owner, -1:], response_hidden[:, :-1]], 1)  # (M, R, d)
    out = []
    for i in range(0, hidden.shape[0], 8):  # bounded memory for the (b, R, V) logits
        logp = F.log_softmax(head(hidden[i:i + 8]).float() / temperature, -1)
        token = torch.gather(logp, 2, batch.response_ids[i:i + 8].unsqueeze(-1)).squeeze(-1)
        out.append(token * batch.response_mask[i:i + 8])
    return torch.cat(out)


def shared_sequence_logprobs(model, batch: SharedBatch, *, temperature: float = 1.0) -> torch.Tensor:
    """Sum over each response's tokens of log pi(y_t | x, y_<t), (M,), each prompt run once."""
    return shared_token_logprobs(model, batch, temperature=temperature).sum(-1)


def token_logprobs(model, batch: Batch, *, temperature: float = 1.0, hidden: torch.Tensor | None = None,
                   with_entropy: bool = False):
    """Log-probabilities (B, T) of each response token given the ones before it; 0 in the
    prompt columns (before `batch.prompt_len`), where no response token is predicted.

    Logits are divided by the sampling temperature, so these match the sampler's
    log-probs. The LM head runs only at the positions that predict a response token, and
    only the chosen tokens' log-probs are kept: the (B, R, V) logits are made and freed in
    chunks over the batch. With `with_entropy`, also returns the entropy (B, T) of the
    distribution each response token was drawn from.
    """
    if hidden is None:
        hidden = forward_hidden(model, batch.input_ids, batch.attention_mask)
    head = unwrap(model).get_output_embeddings()
    logprobs = torch.zeros(batch.input_ids.shape, dtype=torch.float32, device=batch.input_ids.device)
    entropy = torch.zeros_like(logprobs) if with_entropy else None
    P = max(1, batch.prompt_len)  # responses start at column P; position t - 1 predicts token t
    for i in range(0, hidden.shape[0], 8):  # bounded memory for the (b, R, V) logits
        logp = F.log_softmax(head(hidden[i:i + 8, P - 1:-1]).float() / temperature, -1)
        targets = batch.input_ids[i:i + 8, P:]
        logprobs[i:i + 8, P:] = torch.gather(logp, 2, targets.unsqueeze(-1)).squeeze(-1)
        if with_entropy:
            entropy[i:i + 8, P:] = -(logp.exp() * logp).sum(-1)
    return (logprobs, entropy) if with_entropy else logprobs


def last_token_index(attention_mask: torch.Tensor) -> torch.Tensor:
    """Index (B,) of the last real token in each row (rewards are read there)."""
    T = attention_mask.shape[1]
    idx = torch.arange(T, device=attention_mask.device).expand_as(attention_mask)
    return (idx * attention_mask.long()).argmax(-1)


class TokenLogprobs(torch.nn.Module):
    """A policy whose forward gives token log-probs: (B, T) of a Batch, (M, R) of a SharedBatch's
    responses: the module the optimiser and accelerate wrap, so DDP sees (and syncs) the
    gradients of that one forward call."""

    def __init__(self, policy):
        super().__init__()
        self.policy = policy

    def forward(self, batch: Batch | SharedBatch, temperature: float = 1.0) -> torch.Tensor:
        if isinstance(batch, SharedBatch):
            return shared_token_logprobs(self.policy, batch, temperature=temperature)
        return token_logprobs(self.policy, batch, temperature=temperature)


# ---------------------------------------------------------------------------
# Language-model sequences: token ids and a loss mask (pretraining and SFT)
# ---------------------------------------------------------------------------

@dataclass
class LMExample:
    """One training sequence: token ids, and which of them the loss is taken on. A packed row
    (`pack_examples`) also has position ids that restart at each example's first token."""

    input_ids: list[int]
    loss_mask: list[int]  # 1 where the token is predicted (a response token, or any corpus token)
    position_ids: list[int] | None = None


def pack_examples(examples: Sequence[LMExample], seq_len: int) -> list[LMExample]:
    """Examples concatenated, in order, into rows of at most `seq_len` tokens (a row takes the
    next example while it fits; an example longer than `seq_len` is cut to it). Each example's
    positions restart at 0, and its first token is not a target (in its own row nothing
    predicts it; here the previous example's last token would). Run with `collate_lm`, the
    model sees each example as if alone: attention stays within it (transformers builds a
    block-diagonal causal mask from the restarting positions), so the summed loss is the
    unpacked one, with less padding."""
    rows: list[LMExample] = []
    ids: list[int] = []
    mask: list[int] = []
    pos: list[int] = []
    for e in examples:
        n = min(len(e.input_ids), seq_len)
        if ids and len(ids) + n > seq_len:
            rows.append(LMExample(ids, mask, pos))
            ids, mask, pos = [], [], []
        ids = ids + e.input_ids[:n]
        mask = mask + [0] + e.loss_mask[1:n]
        pos = pos + list(range(n))
    if ids:
        rows.append(LMExample(ids, mask, pos))
    return rows


def collate_lm(examples: list[LMExample], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-padded (B, T) tensors; labels are -100 where no loss is taken. Packed rows get
    `position_ids` (the padding after a row's examples is one more segment of its own) and no
    attention mask: the restarting positions are what keeps attention within each example."""
    T = max(len(e.input_ids) for e in examples)
    input_ids = torch.full((len(examples), T), pad_id, dtype=torch.long)
    attention = torch.zeros((len(examples), T), dtype=torch.long)
    labels = torch.full((len(examples), T), -100, dtype=torch.long)
    packed = any(e.position_ids is not None for e in examples)
    positions = torch.zeros((len(examples), T), dtype=torch.long)
    for i, e in enumerate(examples):
        n = len(e.input_ids)
        ids = torch.tensor(e.input_ids, dtype=torch.long)
        input_ids[i, :n] = ids
        attention[i, :n] = 1
        labels[i, :n] = torch.where(torch.tensor(e.loss_mask, dtype=torch.bool), ids, torch.tensor(-100))
        positions[i, :n] = torch.tensor(e.position_ids if e.position_ids is not None else range(n))
        positions[i, n:] = torch.arange(T - n)
    if packed:
        return {"input_ids": input_ids, "position_ids": positions, "labels": labels}
    return {"input_ids": input_ids, "attention_mask": attention, "labels": labels}


def token_nll(model, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, int]:
    """(sum of next-token negative log-likelihoods over labelled tokens, number of such tokens)."""
    # no cache: with one, transformers would not read packed rows' restarting positions as a mask
    logits = model(input_ids=batch["input_ids"], attention_mask=batch.get("attention_mask"),
                   position_ids=batch.get("position_ids"), use_cache=False).logits
    targets = batch["labels"][:, 1:]
    nll = torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1).float(), targets.flatten(),
                                            ignore_index=-100, reduction="sum")
    return nll, int((targets != -100).sum())


@torch.no_grad()
def evaluate_nll(model, examples: list[LMExample], pad_id: int, batch_size: int) -> float:
    """Mean per-token negative log-likelihood on held-out examples."""
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    device = next(model.parameters()).device
    for i in range(0, len(examples), batch_size):
        batch = {k: v.to(device) for k, v in collate_lm(examples[i:i + batch_size], pad_id).items()}
        nll, n = token_nll(model, batch)
        total, count = total + float(nll), count + n
    model.train(was_training)
    return total / max(1, count)


@torch.no_grad()
def batched_pair_logprobs(model, tokenizer, prompts: Sequence, chosen: Sequence[str], rejected: Sequence[str], *,
                          max_prompt_len: int, max_response_len: int, batch_size: int = 32
                          ) -> tuple[torch.Tensor, torch.Tensor]:
    """Sequence log-probs (N,) of the chosen and of the rejected responses, each prompt run once
    for its two responses, in batches of similar length (less padding), without gradients."""
    was_training = model.training
    model.eval()
    order = sorted(range(len(prompts)), key=lambda i: shared_width(prompts[i], [chosen[i], rejected[i]]))
    out = torch.zeros((len(prompts), 2))
    for start in range(0, len(order), batch_size):
        rows = order[start:start + batch_size]
        batch = shared_batch(tokenizer, [prompts[i] for i in rows], [(chosen[i], rejected[i]) for i in rows],
                             max_prompt_len=max_prompt_len, max_response_len=max_response_len)
        out[rows] = shared_sequence_logprobs(model, batch.to(device_of(model))).cpu().view(-1, 2)
    model.train(was_training)
    return out[:, 0], out[:, 1]
