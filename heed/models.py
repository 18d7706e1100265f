"""Tokenizers and causal language models: train, build from presets, save, load; batching.

Any local Hugging Face causal-LM directory is accepted wherever a model is
(`load_policy(path)`): nothing is fetched from a hub.

Batch layout used by every stage (the TRL layout): prompts left-padded,
responses right-padded, concatenated: `[pad pad p p p | r r r EOS pad]`.
Position ids are `cumsum(attention_mask) - 1`, so a left-padded prompt gets the
same positions as an unpadded one (Huang et al. 2023, "N implementation details").
"""

from __future__ import annotations

import json
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
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(path))
    if tok.eos_token_id is None:
        raise HeedError(f"{path}: tokenizer has no EOS token")
    if tok.pad_token_id is None or tok.pad_token_id == tok.eos_token_id:
        # A separate pad token keeps "the response ended" distinguishable from padding.
        tok.add_special_tokens({"pad_token": PAD_TOKEN})
    tok.padding_side = "left"
    return tok


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


def load_policy(path: str | Path, *, dtype: torch.dtype = torch.float32):
    """(model, tokenizer) from a local HF directory; dropout off (eval mode) for RL stability."""
    from transformers import AutoModelForCausalLM

    path = Path(path)
    if not (path / "config.json").exists():
        raise HeedError(f"{path}: not a model directory (no config.json); train one with `heed pretrain`")
    tokenizer = load_tokenizer(path)
    model = AutoModelForCausalLM.from_pretrained(str(path), dtype=dtype)
    if model.get_input_embeddings().num_embeddings < len(tokenizer):
        model.resize_token_embeddings(len(tokenizer))
    disable_dropout(model)
    fuse_activations(model)
    return model, tokenizer


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
    """Token ids of each formatted prompt; long prompts keep their end (the question)."""
    ids = tokenizer([format_prompt(p) for p in prompts], add_special_tokens=False)["input_ids"]
    return [x[-max_len:] for x in ids]


def encode_responses(tokenizer, responses: Sequence[str], max_len: int, *, add_eos: bool = True) -> list[list[int]]:
    """Token ids of " " + response (+ EOS), truncated to max_len (truncated ones lose their EOS)."""
    ids = tokenizer([" " + r for r in responses], add_special_tokens=False)["input_ids"]
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
    out = model.base_model(input_ids=input_ids, attention_mask=attention_mask,
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
    Equal (up to rounding) to running every prompt + response row in full."""
    trunk = model.base_model
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


def shared_token_logprobs(model, batch: SharedBatch, *, temperature: float = 1.0) -> torch.Tensor:
    """log pi(y_t | x, y_<t) of every response token, (M, R), 0 on padding; each prompt run once,
    the LM head only where a response token is predicted (the prompt's last position, then the
    response's)."""
    prompt_hidden, response_hidden = forward_shared(model, batch)
    head = model.get_output_embeddings()
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
    head = model.get_output_embeddings()
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
    """One training sequence: token ids, and which of them the loss is taken on."""

    input_ids: list[int]
    loss_mask: list[int]  # 1 where the token is predicted (a response token, or any corpus token)


def collate_lm(examples: list[LMExample], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-padded (B, T) tensors; labels are -100 where no loss is taken."""
    T = max(len(e.input_ids) for e in examples)
    input_ids = torch.full((len(examples), T), pad_id, dtype=torch.long)
    attention = torch.zeros((len(examples), T), dtype=torch.long)
    labels = torch.full((len(examples), T), -100, dtype=torch.long)
    for i, e in enumerate(examples):
        n = len(e.input_ids)
        ids = torch.tensor(e.input_ids, dtype=torch.long)
        input_ids[i, :n] = ids
        attention[i, :n] = 1
        labels[i, :n] = torch.where(torch.tensor(e.loss_mask, dtype=torch.bool), ids, torch.tensor(-100))
    return {"input_ids": input_ids, "attention_mask": attention, "labels": labels}


def token_nll(model, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, int]:
    """(sum of next-token negative log-likelihoods over labelled tokens, number of such tokens)."""
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
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
