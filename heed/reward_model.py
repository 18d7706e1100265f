"""The reward model: K members, each a causal-LM trunk with a scalar head, and their normalisation.

    rm = RewardModel.load("runs/rm")                 # one call, normalisation included
    mean, std = rm.score(prompts, responses)          # lists: normalised reward, spread across members
    rewards = rm.rewards(batch)                       # (K, B) tensor on token batches (for PPO)

A member reads the trunk's last hidden state at the last real token of
`prompt + response + EOS` (prompts left-padded, responses right-padded: the
layout of heed.models) and maps it to a scalar with a linear head initialised
N(0, 1/sqrt(d_model + 1)) with zero bias (Stiennon et al. 2020, as in
lm-human-preferences). Dropout is off. The trunk starts as the SFT model's.

Normalisation: member k's raw reward r_k becomes gain_k * r_k + bias_k, with the
constants fitted (`fit_normalization`) on responses sampled from the SFT policy
so that each member has mean 0 there, and the members' mean has mean 0 and
standard deviation 1 (Ziegler et al. 2019; Huang et al. 2023, "N implementation
details"). All members share the last scale factor, so `std` (the population
standard deviation across members; 0 when K = 1) is in the units of `mean`.

A token-level member (`TokenRewardMember`, from `heed rm train --format spans`) reads
every response token instead: its head classifies each token as outside any marked span,
or beginning or inside a span of each label (BIO tags), and each label carries a reward
(its sign and weight). A span's reward is earned at its last token (Wu et al. 2023,
Fine-Grained RLHF): token t gets sum_l w_l * P(t in a span of l) * (1 - P(t + 1 continues
it)), the expected reward of the spans ending at t, and the response's scalar reward is
the sum over its tokens, so every scalar path (normalisation, `score`, PPO, `heed rm eval`)
takes it as it takes any member, and `dense` gives the per-token rewards.

On disk (`save` / `load`):
    reward_model.json     members, gain, bias, lengths, normalisation statistics
    tokenizer files       one tokenizer for every member
    member_0/ …           each member: config.json + model.safetensors (trunk), head.safetensors
                          (a token-level member also labels.json: its labels and their rewards)
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Sequence

import torch
from torch import nn

from heed.losses import span_end_rewards
from heed.models import (
    Batch,
    SharedBatch,
    disable_dropout,
    forward_hidden,
    forward_shared,
    fuse_activations,
    last_token_index,
    load_policy,
    load_tokenizer,
    make_batch,
    merged,
    shared_batch,
    shared_width,
)
from heed.utils import HeedError, atomic_write_text

META_FILE = "reward_model.json"


class RewardMember(nn.Module):
    """One reward model: a causal-LM trunk and a linear head read at the last real token."""

    def __init__(self, trunk: nn.Module, head: nn.Linear | None = None, *, seed: int = 0,
                 lm_head: nn.Module | None = None):
        super().__init__()
        self.trunk = trunk
        self.lm_head = lm_head  # kept only while training with a language-modelling term
        d = trunk.config.hidden_size
        if head is None:
            head = nn.Linear(d, 1)
            generator = torch.Generator().manual_seed(seed)  # members of an ensemble start differently
            with torch.no_grad():
                head.weight.copy_(torch.randn(1, d, generator=generator) / math.sqrt(d + 1))
                head.bias.zero_()
        self.head = head
        disable_dropout(self.trunk)

    @classmethod
    def from_policy(cls, path: str | Path, *, seed: int = 0, keep_lm_head: bool = False) -> "RewardMember":
        """A new member whose trunk is the causal LM at `path` (its LM head dropped unless kept)."""
        model, _ = load_policy(path)
        return cls(model.base_model, seed=seed, lm_head=model.get_output_embeddings() if keep_lm_head else None)

    def forward(self, input_ids: torch.Tensor | SharedBatch, attention_mask: torch.Tensor | None = None, *,
                lm_rows: torch.Tensor | None = None):
        """Raw rewards (B,) at each row's last real token; given a SharedBatch, (M,) rewards of its
        responses, each prompt run once (the path training takes: DDP sees one forward either way).
        With `lm_rows` (indices of a SharedBatch's responses), also their mean next-token
        negative log-likelihoods (len(lm_rows),) under the kept LM head."""
        if isinstance(input_ids, SharedBatch):
            return self.forward_shared(input_ids, lm_rows=lm_rows)
        hidden = forward_hidden(self.trunk, input_ids, attention_mask)             # (B, T, d)
        last = hidden[torch.arange(hidden.shape[0], device=hidden.device), last_token_index(attention_mask)]
        return self.head(last.to(self.head.weight.dtype)).squeeze(-1).float()     # (B,)

    def batch_rewards(self, batch: Batch) -> torch.Tensor:
        """Raw rewards (B,) of a token batch."""
        return self(batch.input_ids, batch.attention_mask)

    def forward_shared(self, batch: SharedBatch, *, lm_rows: torch.Tensor | None = None):
        """Raw rewards (M,) of responses that share prompts, each prompt run once (models.forward_shared);
        with `lm_rows`, also those responses' mean token NLLs."""
        prompt_hidden, response_hidden = forward_shared(self.trunk, batch)
        lengths = batch.response_mask.sum(-1)
        rows = torch.arange(len(lengths), device=lengths.device)
        last = response_hidden[rows, (lengths - 1).clamp(min=0)]
        # an empty response: the reward is read at the prompt's last token
        last = torch.where((lengths > 0)[:, None], last, prompt_hidden[batch.owner, -1])
        rewards = self.head(last.to(self.head.weight.dtype)).squeeze(-1).float()
        if lm_rows is None:
            return rewards
        if self.lm_head is None:
            raise ValueError("this member keeps no LM head (RewardMember.from_policy(..., keep_lm_head=True))")
        # position t - 1 predicts response token t; the prompt's last position predicts the first
        hidden = torch.cat([prompt_hidden[batch.owner[lm_rows], -1:], response_hidden[lm_rows, :-1]], 1)
        targets = batch.response_ids[lm_rows].masked_fill(batch.response_mask[lm_rows] == 0, -100)
        nll = nn.functional.cross_entropy(self.lm_head(hidden).float().transpose(1, 2), targets,
                                          ignore_index=-100, reduction="none").sum(-1)
        return rewards, nll / batch.response_mask[lm_rows].sum(-1).clamp(min=1)

    def save(self, path: str | Path) -> None:
        """The trunk as a plain model directory and the head; a trunk trained with LoRA is saved
        with its adapter merged in (a member directory holds whole weights, whatever trained them)."""
        from safetensors.torch import save_file

        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        self.trunk = merged(self.trunk)
        self.trunk.save_pretrained(path)
        save_file({k: v.detach().contiguous().cpu() for k, v in self.head.state_dict().items()},
                  str(path / "head.safetensors"))

    @classmethod
    def load(cls, path: str | Path) -> "RewardMember":
        from safetensors.torch import load_file
        from transformers import AutoModel

        path = Path(path)
        if not (path / "head.safetensors").exists() or not (path / "config.json").exists():
            raise HeedError(f"{path}: not a reward-model member (needs config.json and head.safetensors)")
        trunk = AutoModel.from_pretrained(str(path), dtype=torch.float32)
        fuse_activations(trunk)
        state = load_file(str(path / "head.safetensors"))
        head = nn.Linear(state["weight"].shape[1], state["weight"].shape[0])
        head.load_state_dict(state)
        if (path / LABELS_FILE).exists():
            labels = json.loads((path / LABELS_FILE).read_text())
            return TokenRewardMember(trunk, labels["labels"], labels["rewards"], head=head)
        return cls(trunk, head)


LABELS_FILE = "labels.json"


def token_tags(text: str, char_ends: Sequence[int], spans: Sequence, labels: Sequence[str]) -> list[int]:
    """BIO tag of each response token (class ids of TokenRewardMember) from spans marked on `text`
    (objects with start, end, label; character offsets): a token is in a span when a character
    it covers, other than a space, lies inside it, and the first such token begins the span.
    Spans of labels not in `labels` are left outside."""
    index = {label: i for i, label in enumerate(labels)}
    tags = [0] * len(char_ends)
    for span in spans:
        if span.label not in index:
            continue
        first = True
        for t, hi in enumerate(char_ends):
            lo = char_ends[t - 1] if t else 0
            a, b = max(lo, span.start), min(hi, span.end)
            if a < b and text[a:b].strip():
                tags[t] = 1 + 2 * index[span.label] + (0 if first else 1)
                first = False
    return tags


class TokenRewardMember(RewardMember):
    """A member that reads every response token: BIO tags over `labels` (class 0 outside any span,
    1 + 2l beginning and 2 + 2l inside a span of label l), each label worth `rewards[l]`."""

    def __init__(self, trunk: nn.Module, labels: Sequence[str], rewards: Sequence[float], *,
                 head: nn.Linear | None = None, seed: int = 0):
        d = trunk.config.hidden_size
        if head is None:
            head = nn.Linear(d, 1 + 2 * len(labels))
            generator = torch.Generator().manual_seed(seed)
            with torch.no_grad():
                head.weight.copy_(torch.randn(head.weight.shape, generator=generator) / math.sqrt(d + 1))
                head.bias.zero_()
        super().__init__(trunk, head)
        if len(rewards) != len(labels) or head.out_features != 1 + 2 * len(labels):
            raise HeedError(f"a token-level head needs 1 + 2 x {len(labels)} classes and one reward per label")
        self.labels, self.label_rewards = list(labels), [float(r) for r in rewards]

    @classmethod
    def from_policy(cls, path: str | Path, labels: Sequence[str] = (), rewards: Sequence[float] = (), *,
                    seed: int = 0) -> "TokenRewardMember":
        model, _ = load_policy(path)
        return cls(model.base_model, labels, rewards, seed=seed)

    def token_logits(self, batch: SharedBatch) -> torch.Tensor:
        """(M, R, 1 + 2L) tag logits of every response token, each prompt run once."""
        _, response_hidden = forward_shared(self.trunk, batch)
        return self.head(response_hidden.to(self.head.weight.dtype)).float()

    def token_rewards(self, logits: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """(M, R) raw per-token rewards from tag logits: each label's reward times the chance
        that a span of it ends at the token (losses.span_end_rewards)."""
        return span_end_rewards(logits.softmax(-1), torch.tensor(self.label_rewards), mask)

    def forward(self, input_ids: torch.Tensor | SharedBatch, attention_mask: torch.Tensor | None = None, *,
                lm_rows: torch.Tensor | None = None, logits: bool = False):
        """Raw rewards (M,) of a SharedBatch's responses, the sum of their per-token rewards; with
        `logits`, the (M, R, C) tag logits instead (what training needs, through DDP's forward)."""
        if not isinstance(input_ids, SharedBatch) or lm_rows is not None:
            raise ValueError("a token-level member scores SharedBatches (models.shared_batch) only")
        tag_logits = self.token_logits(input_ids)
        if logits:
            return tag_logits
        return self.token_rewards(tag_logits, input_ids.response_mask.float()).sum(-1)

    def batch_rewards(self, batch: Batch) -> torch.Tensor:
        return self(batch.share_prompts(1))

    def save(self, path: str | Path) -> None:
        super().save(path)
        atomic_write_text(Path(path) / LABELS_FILE, json.dumps({"labels": self.labels,
                                                                "rewards": self.label_rewards}))


class RewardModel(nn.Module):
    """An ensemble of K reward members (K = 1 by default) with per-member normalisation."""

    def __init__(self, members: Sequence[RewardMember], tokenizer, *, gain: Sequence[float] | None = None,
                 bias: Sequence[float] | None = None, max_prompt_len: int = 128, max_response_len: int = 128,
                 info: dict | None = None):
        super().__init__()
        if not members:
            raise ValueError("a reward model needs at least one member")
        self.members = nn.ModuleList(members)
        self.tokenizer = tokenizer
        K = len(members)
        self.register_buffer("gain", torch.tensor(list(gain) if gain is not None else [1.0] * K))
        self.register_buffer("bias", torch.tensor(list(bias) if bias is not None else [0.0] * K))
        self.max_prompt_len, self.max_response_len = max_prompt_len, max_response_len
        self.info = dict(info or {})  # normalisation statistics and how the model was trained
        self.eval()

    @property
    def n_members(self) -> int:
        return len(self.members)

    # -- tensors ------------------------------------------------------------------

    def raw_rewards(self, batch: Batch) -> torch.Tensor:
        """(K, B) unnormalised rewards, one row per member."""
        return torch.stack([m.batch_rewards(batch) for m in self.members])

    def rewards(self, batch: Batch, *, normalize: bool = True) -> torch.Tensor:
        """(K, B) rewards of token batches (the policy must share this model's tokenizer).

        The mean over dim 0 is the ensemble's reward; the spread over dim 0 its uncertainty.
        """
        raw = self.raw_rewards(batch)
        return raw * self.gain[:, None] + self.bias[:, None] if normalize else raw

    # -- text ---------------------------------------------------------------------

    @torch.no_grad()
    def raw_scores(self, prompts: Sequence, responses: Sequence[str], *, batch_size: int = 64) -> torch.Tensor:
        """(K, N) unnormalised rewards of (prompt, response) texts, on the CPU."""
        if len(prompts) != len(responses):
            raise ValueError(f"{len(prompts)} prompts but {len(responses)} responses")
        device = next(self.parameters()).device
        # Similar lengths together: less padding. Results go back in input order.
        order = sorted(range(len(prompts)), key=lambda i: shared_width(prompts[i], [responses[i]]))
        out = torch.zeros(self.n_members, len(prompts))
        for start in range(0, len(order), batch_size):
            idx = order[start:start + batch_size]
            batch = make_batch(self.tokenizer, [prompts[i] for i in idx], [responses[i] for i in idx],
                               max_prompt_len=self.max_prompt_len, max_response_len=self.max_response_len)
            out[:, idx] = self.raw_rewards(batch.to(device)).cpu()
        return out

    @property
    def is_dense(self) -> bool:
        """Whether the members give per-token rewards (trained on marked spans)."""
        return all(isinstance(m, TokenRewardMember) for m in self.members)

    @torch.no_grad()
    def token_outputs(self, prompts: Sequence, responses: Sequence[str], *, batch_size: int = 64
                      ) -> list[tuple[list[int], torch.Tensor, torch.Tensor]]:
        """Per response: (each token's end in the text, (K, R) raw per-token rewards, (K, R, C) tag
        probabilities); responses as this model's tokenizer reads them (EOS included, truncated)."""
        if not self.is_dense:
            raise HeedError("per-token rewards need a token-level reward model (heed rm train --format spans)")
        from heed.generate import response_char_ends

        device = next(self.parameters()).device
        out: list = [None] * len(prompts)
        order = sorted(range(len(prompts)), key=lambda i: shared_width(prompts[i], [responses[i]]))
        for start in range(0, len(order), batch_size):
            idx = order[start:start + batch_size]
            batch = shared_batch(self.tokenizer, [prompts[i] for i in idx], [[responses[i]] for i in idx],
                                 max_prompt_len=self.max_prompt_len, max_response_len=self.max_response_len).to(device)
            mask = batch.response_mask.float()
            logits = [m.token_logits(batch) for m in self.members]
            rewards = torch.stack([m.token_rewards(x, mask) for m, x in zip(self.members, logits)]).cpu()
            probs = torch.stack([x.softmax(-1) for x in logits]).cpu()
            for j, i in enumerate(idx):
                n = int(mask[j].sum())
                ids = batch.response_ids[j, :n].tolist()
                out[i] = (response_char_ends(self.tokenizer, ids), rewards[:, j, :n], probs[:, j, :n])
        return out

    def dense(self, prompts: Sequence, responses: Sequence[str], *, batch_size: int = 64
              ) -> list[list[tuple[int, float]]]:
        """Per response, (end character, normalised reward) of every token: the ensemble's mean
        of gain_k * r_k,t, each member's bias added at the last token; sums equal `score`'s mean."""
        out = []
        for ends, rewards, _ in self.token_outputs(prompts, responses, batch_size=batch_size):
            z = (rewards * self.gain.cpu()[:, None]).mean(0)
            segments = [(e, float(v)) for e, v in zip(ends, z)]
            segments.append((ends[-1] if ends else 0, float(self.bias.cpu().mean())))
            out.append(segments)
        return out

    def normalize(self, raw: torch.Tensor) -> torch.Tensor:
        """(K, N) raw rewards -> (K, N) normalised ones."""
        return raw * self.gain.cpu()[:, None] + self.bias.cpu()[:, None]

    def score(self, prompts: Sequence, responses: Sequence[str], *, batch_size: int = 64
              ) -> tuple[list[float], list[float]]:
        """(mean, std) per (prompt, response): normalised reward and its spread across members."""
        z = self.normalize(self.raw_scores(prompts, responses, batch_size=batch_size))
        std = z.std(0, unbiased=False) if self.n_members > 1 else torch.zeros(z.shape[1])
        return z.mean(0).tolist(), std.tolist()

    def fit_normalization(self, raw: torch.Tensor) -> dict:
        """Set gain and bias from (K, N) raw rewards of SFT samples; returns the statistics.

        Each member is standardised on the samples; then one shared factor makes the
        members' mean have standard deviation 1 (it is below 1 when members disagree).
        """
        if raw.shape[1] < 2:
            raise ValueError("normalisation needs at least 2 samples")
        mu, sd = raw.mean(1), raw.std(1, unbiased=False).clamp(min=1e-6)   # (K,)
        z = (raw - mu[:, None]) / sd[:, None]
        scale = 1.0 / float(z.mean(0).std(unbiased=False).clamp(min=1e-6))
        self.gain.copy_((scale / sd).to(self.gain))
        self.bias.copy_((-scale * mu / sd).to(self.bias))
        normalised = self.normalize(raw).mean(0)
        stats = {"n_samples": raw.shape[1], "raw_mean": mu.tolist(), "raw_std": sd.tolist(),
                 "ensemble_scale": scale, "mean_after": float(normalised.mean()),
                 "std_after": float(normalised.std(unbiased=False))}
        self.info["normalization"] = stats
        return stats

    # -- files --------------------------------------------------------------------

    def save(self, path: str | Path) -> None:
        """Members and tokenizer first, `reward_model.json` last: its presence means complete."""
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        for k, member in enumerate(self.members):
            member.save(path / f"member_{k}")
        self.tokenizer.save_pretrained(path)
        meta = {"format": "heed-reward-model", "version": 1, "n_members": self.n_members,
                "gain": self.gain.tolist(), "bias": self.bias.tolist(),
                "max_prompt_len": self.max_prompt_len, "max_response_len": self.max_response_len, **self.info}
        atomic_write_text(path / META_FILE, json.dumps(meta, indent=2))

    @classmethod
    def load(cls, path: str | Path) -> "RewardModel":
        path = Path(path)
        meta_file = path / META_FILE
        if not meta_file.exists():
            raise HeedError(f"{path}: not a reward model directory (no {META_FILE}); train one with `heed rm train`")
        try:
            meta = json.loads(meta_file.read_text())
            n = int(meta["n_members"])
            gain, bias = meta["gain"], meta["bias"]
        except (ValueError, KeyError, TypeError) as e:
            raise HeedError(f"{meta_file}: unreadable ({e})") from None
        if len(gain) != n or len(bias) != n:
            raise HeedError(f"{meta_file}: gain and bias need {n} values each")
        members = [RewardMember.load(path / f"member_{k}") for k in range(n)]
        if len({isinstance(m, TokenRewardMember) for m in members}) > 1:
            raise HeedError(f"{path}: mixes token-level and scalar members")
        info = {k: v for k, v in meta.items() if k not in ("format", "version", "n_members", "gain", "bias",
                                                           "max_prompt_len", "max_response_len")}
        return cls(members, load_tokenizer(path), gain=gain, bias=bias, max_prompt_len=meta["max_prompt_len"],
                   max_response_len=meta["max_response_len"], info=info)


def load_reward_model(path: str | Path) -> RewardModel:
    """A saved reward model (or ensemble) directory, from `heed rm train`."""
    return RewardModel.load(path)
