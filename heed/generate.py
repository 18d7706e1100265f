"""Batched sampling with a KV cache, and the `heed sample` stage.

One forward pass over the (left-padded) prompts fills the cache; after that each
new token costs one single-token forward pass. Log-probabilities are those of
the chosen tokens under softmax(logits / temperature), *before* top-k / top-p
filtering: the quantity a policy-gradient update differentiates (as in TRL).
Rows that have emitted EOS keep receiving PAD, masked out of attention.
"""

from __future__ import annotations

import inspect
import math
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import torch
import torch.nn.functional as F

from heed.config import option
from heed.data import read_prompts, write_jsonl
from heed.models import encode_prompts, load_policy, position_ids, unwrap
from heed.template import prompt_key
from heed.utils import progress, seed_everything


@dataclass
class Sample:
    prompt: str | list
    response: str
    response_ids: list[int]    # generated tokens, EOS included when the response ended
    logprobs: list[float]      # per generated token, under logits / temperature
    finished: bool             # emitted EOS within max_new_tokens
    prompt_ids: list[int]
    index: int = 0             # which of the n samples for this prompt


def _filter_logits(logits: torch.Tensor, top_k: int, top_p: float) -> torch.Tensor:
    """Mask logits outside the top-k and outside the smallest set with probability >= top_p."""
    if top_k > 0:
        kth = torch.topk(logits, min(top_k, logits.shape[-1]), dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True, dim=-1)
        cumulative = sorted_logits.softmax(-1).cumsum(-1)
        drop = cumulative - sorted_logits.softmax(-1) > top_p  # keep the token that crosses top_p
        sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
        logits = torch.full_like(logits, float("-inf")).scatter(-1, order, sorted_logits)
    return logits


def reserved_cache(model, capacity: int, rows: torch.Tensor | None = None):
    """A KV cache whose layers are allocated once, `capacity` positions long, and written in
    place: Hugging Face's default cache concatenates every layer's keys and values at every new
    token, which copies the whole cache each step (a fifth of a decoding step's time on a small
    model). With `rows` (the prompt row each sequence continues), the first pass runs the
    distinct prompts only and each sequence gets its prompt's keys and values. None where the
    model's layers are not plain full-attention ones (sliding windows, linear attention): those
    keep the model's own cache."""
    from transformers.cache_utils import DynamicCache, DynamicLayer

    class ReservedLayer(DynamicLayer):
        def lazy_initialization(self, key_states, value_states):
            super().lazy_initialization(key_states, value_states)
            B, H, _, D = key_states.shape
            B = B if rows is None else len(rows)
            self._k = key_states.new_empty((B, H, capacity, D))
            self._v = value_states.new_empty((B, H, capacity, value_states.shape[-1]))
            self._len = 0

        def update(self, key_states, value_states, *args, **kwargs):
            if not self.is_initialized:
                self.lazy_initialization(key_states, value_states)
            start, end = self._len, self._len + key_states.shape[-2]
            if end > capacity:
                raise ValueError(f"KV cache of {capacity} positions is full")
            self._len = end
            if start == 0 and key_states.shape[0] != self._k.shape[0]:  # the distinct prompts' pass
                self._k[:, :, :end] = key_states.index_select(0, rows)
                self._v[:, :, :end] = value_states.index_select(0, rows)
                self.keys, self.values = self._k[:, :, :end], self._v[:, :, :end]
                return key_states, value_states
            self._k[:, :, start:end] = key_states
            self._v[:, :, start:end] = value_states
            self.keys, self.values = self._k[:, :, :end], self._v[:, :, :end]
            return self.keys, self.values

        def get_seq_length(self) -> int:
            return self._len if self.is_initialized else 0

    try:
        cache = DynamicCache(config=model.config)
    except Exception:  # a config transformers' cache cannot read: the model makes its own
        return None
    if not cache.layers or any(type(layer) is not DynamicLayer for layer in cache.layers):
        return None
    cache.layers = [ReservedLayer() for _ in cache.layers]
    return cache


@torch.no_grad()
def sample_tokens(model, prompt_ids: Sequence[list[int]], *, pad_id: int, eos_id: int, max_new_tokens: int,
                  temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0,
                  generator: torch.Generator | None = None, value_head: torch.nn.Module | None = None):
    """Sample continuations of token-id prompts.

    Returns (tokens (B, R) padded with pad_id after EOS, logprobs (B, R) zero on
    padding, finished (B,) bool, values (B, R) or None). With `value_head` (PPO's
    value head on the policy trunk), the value of the state before each token is
    read off the same forward pass that chose the token: no second pass.
    """
    model = unwrap(model)  # a peft policy: the transformers model inside, its adapter active
    device = next(model.parameters()).device
    # consecutive rows with the same prompt (n samples of one prompt) share its first pass
    distinct, owner = [], []
    for p in prompt_ids:
        if not distinct or list(p) != distinct[-1]:
            distinct.append(list(p))
        owner.append(len(distinct) - 1)
    B, P = len(prompt_ids), max(len(p) for p in distinct)
    input_ids = torch.full((len(distinct), P), pad_id, dtype=torch.long, device=device)
    attention = torch.zeros((len(distinct), P), dtype=torch.long, device=device)
    for i, p in enumerate(distinct):
        input_ids[i, P - len(p):] = torch.tensor(p, dtype=torch.long)
        attention[i, P - len(p):] = 1
    extra = {"logits_to_keep": 1} if "logits_to_keep" in inspect.signature(model.forward).parameters else {}
    if value_head is not None:
        extra["output_hidden_states"] = True
    rows = torch.tensor(owner, device=device)
    cache = reserved_cache(model, P + max_new_tokens, rows if len(distinct) < B else None)
    if cache is None and len(distinct) < B:  # the model keeps its own cache: every row runs its prompt
        input_ids, attention, rows = input_ids[rows], attention[rows], torch.arange(B, device=device)
    if cache is not None:
        extra["past_key_values"] = cache
    out = model(input_ids=input_ids, attention_mask=attention, position_ids=position_ids(attention),
                use_cache=True, **extra)
    attention = attention[rows]
    next_pos = attention.sum(-1)  # (B,) position of the next token
    finished = torch.zeros(B, dtype=torch.bool, device=device)
    tokens, logprobs, values = [], [], []
    for step in range(max_new_tokens):
        logits = (out.logits[rows, -1, :] if step == 0 else out.logits[:, -1, :]).float()
        if value_head is not None:
            hidden = out.hidden_states[-1][:, -1]
            hidden = hidden[rows] if step == 0 else hidden
            hidden = hidden.to(value_head.weight.dtype)  # bf16 weights (--dtype bf16): the head stays fp32
            values.append(value_head(hidden).squeeze(-1).float().masked_fill(finished, 0.0))
        if temperature > 0:
            scaled = logits / temperature
            probs = _filter_logits(scaled, top_k, top_p).softmax(-1)
            token = torch.multinomial(probs, 1, generator=generator).squeeze(-1)
        else:  # greedy
            scaled = logits
            token = logits.argmax(-1)
        logprob = F.log_softmax(scaled, -1).gather(-1, token[:, None]).squeeze(-1)
        token = token.masked_fill(finished, pad_id)
        logprobs.append(logprob.masked_fill(finished, 0.0))
        tokens.append(token)
        real = ~finished
        finished = finished | (token == eos_id)
        if bool(finished.all()):
            break
        attention = torch.cat([attention, real.long()[:, None]], dim=1)
        out = model(input_ids=token[:, None], attention_mask=attention, position_ids=next_pos[:, None],
                    past_key_values=out.past_key_values, use_cache=True,
                    output_hidden_states=value_head is not None)
        next_pos = next_pos + real.long()
    return (torch.stack(tokens, 1), torch.stack(logprobs, 1), finished,
            torch.stack(values, 1) if values else None)


def trim_responses(tokens: torch.Tensor, finished: torch.Tensor, *, pad_id: int, eos_id: int) -> list[list[int]]:
    """Each row of `sample_tokens`' (B, R) tokens cut after its EOS (kept); a row that never ended
    is all real tokens (padding comes only after EOS, and may itself be EOS: pad = EOS tokenizers)."""
    lengths = torch.where(finished, (tokens == eos_id).int().argmax(-1) + 1, tokens.shape[1])
    return [tokens[i, :int(n)].tolist() for i, n in enumerate(lengths)]


def to_token_columns(x: torch.Tensor, prompt_len: int, total_len: int) -> torch.Tensor:
    """(B, R) per-response-token values (sampler log-probs, values) -> (B, T) aligned with a
    collated batch whose responses start at column `prompt_len`; zeros elsewhere."""
    out = torch.zeros((x.shape[0], total_len), device=x.device, dtype=torch.float32)
    width = min(x.shape[1], total_len - prompt_len)
    out[:, prompt_len:prompt_len + width] = x[:, :width]
    return out


def generate(model, tokenizer, prompts: Sequence, *, n: int = 1, max_new_tokens: int = 64,
             temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0, batch_size: int = 64,
             max_prompt_len: int = 128, seed: int = 0, desc: str | None = None) -> list[Sample]:
    """n samples for each prompt, in prompt order (all samples of prompt 0 first)."""
    was_training = model.training
    model.eval()
    generator = torch.Generator(device=next(model.parameters()).device).manual_seed(seed)
    jobs = [(i, j) for i, _ in enumerate(prompts) for j in range(n)]
    prompt_ids = encode_prompts(tokenizer, prompts, max_prompt_len)
    # Similar lengths together: less padding; results are put back in order below.
    jobs.sort(key=lambda ij: len(prompt_ids[ij[0]]))
    results: dict[tuple[int, int], Sample] = {}
    bar = progress(total=len(jobs), desc=desc or "sampling", disable=desc is None, unit="sample")
    for start in range(0, len(jobs), batch_size):
        chunk = jobs[start:start + batch_size]
        tokens, logprobs, finished, _ = sample_tokens(
            model, [prompt_ids[i] for i, _ in chunk], pad_id=tokenizer.pad_token_id,
            eos_id=tokenizer.eos_token_id, max_new_tokens=max_new_tokens, temperature=temperature,
            top_k=top_k, top_p=top_p, generator=generator)
        trimmed = trim_responses(tokens, finished, pad_id=tokenizer.pad_token_id, eos_id=tokenizer.eos_token_id)
        for row, ((i, j), ids) in enumerate(zip(chunk, trimmed)):
            results[(i, j)] = Sample(prompt=prompts[i], response=decode_response(tokenizer, ids),
                                     response_ids=ids, logprobs=logprobs[row, :len(ids)].tolist(),
                                     finished=bool(finished[row]), prompt_ids=prompt_ids[i], index=j)
        bar.update(len(chunk))
    bar.close()
    model.train(was_training)
    return [results[(i, j)] for i in range(len(prompts)) for j in range(n)]


def sample_prompts(policy, tokenizer, prompts: Sequence, count: int, *, seed: int, max_new_tokens: int,
                   max_prompt_len: int, desc: str = "sample") -> list[Sample]:
    """`count` samples spread evenly over a seeded choice of the distinct `prompts` (by text):
    as few prompts as `count` allows, each sampled equally often."""
    distinct = list({prompt_key(p): p for p in prompts}.values())
    random.Random(seed).shuffle(distinct)
    n_per = max(1, math.ceil(count / len(distinct)))
    chosen = distinct[:math.ceil(count / n_per)]
    samples = generate(policy, tokenizer, chosen, n=n_per, max_new_tokens=max_new_tokens,
                       max_prompt_len=max_prompt_len, seed=seed, desc=desc)
    return samples[:count]


def decode_response(tokenizer, ids: list[int]) -> str:
    """Text of a response: special tokens dropped, the leading space of the template removed."""
    text = tokenizer.decode(ids, skip_special_tokens=True)
    return text[1:] if text.startswith(" ") else text


def response_char_ends(tokenizer, ids: list[int]) -> list[int]:
    """Where each token of a response ends in its text (`decode_response`): token t covers the
    characters [ends[t - 1], ends[t]). Found by decoding every prefix, which is right for any
    tokenizer (a byte-level BPE splitting one character over two tokens, SentencePiece's
    spaces); kept non-decreasing and within the text. EOS and other special tokens cover none."""
    if not ids:
        return []
    full = len(decode_response(tokenizer, ids))
    texts = tokenizer.batch_decode([ids[:t + 1] for t in range(len(ids))], skip_special_tokens=True)
    ends, last = [], 0
    for text in texts:
        last = min(full, max(last, len(text) - text.startswith(" ")))
        ends.append(last)
    return ends


# ---------------------------------------------------------------------------
# `heed sample`
# ---------------------------------------------------------------------------

@dataclass
class SampleConfig:
    model: str = option(help="policy: a local Hugging Face causal-LM directory")
    prompts: str = option(help="JSONL/Parquet file of rows with a 'prompt' field")
    out: str = option(help="output JSONL: one row per sample (prompt, response, finished, n_tokens)")
    n: int = option(1, "samples per prompt")
    max_new_tokens: int = option(64, "stop after this many tokens if no EOS came")
    temperature: float = option(1.0, "sampling temperature (0 = greedy)")
    top_k: int = option(0, "keep only the k most likely tokens (0 = off)")
    top_p: float = option(1.0, "nucleus sampling: keep the smallest set with this probability (1 = off)")
    batch_size: int = option(64, "sequences generated together")
    limit: int = option(0, "use only the first N prompts (0 = all)")
    seed: int = option(0, "random seed")
    skip_invalid: bool = option(False, "skip and count malformed prompt rows instead of stopping")


def run(cfg: SampleConfig) -> list[dict]:
    seed_everything(cfg.seed)
    prompts = read_prompts(cfg.prompts, skip_invalid=cfg.skip_invalid)
    if cfg.limit:
        prompts = prompts[:cfg.limit]
    model, tokenizer = load_policy(cfg.model)
    samples = generate(model, tokenizer, prompts, n=cfg.n, max_new_tokens=cfg.max_new_tokens,
                       temperature=cfg.temperature, top_k=cfg.top_k, top_p=cfg.top_p,
                       batch_size=cfg.batch_size, seed=cfg.seed, desc="sample")
    rows = [{"prompt": s.prompt, "response": s.response, "finished": s.finished,
             "n_tokens": len(s.response_ids), "sample": s.index} for s in samples]
    write_jsonl(cfg.out, rows)
    print(f"wrote {len(rows)} samples ({len(prompts)} prompts x {cfg.n}) to {Path(cfg.out)}")
    return rows
