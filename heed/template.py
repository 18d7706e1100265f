"""The prompt/response template shared by the world's corpus, SFT, sampling and scoring.

A prompt (a string, or a chat list of {"role", "content"} messages) becomes text
ending in "Assistant:"; the response follows after one space and ends with EOS.
Prompt and response are tokenised separately everywhere (response as " " + text),
which gives the same tokens as tokenising the concatenated text, so pretraining
on whole transcripts and fine-tuning on pairs agree.
"""

from __future__ import annotations

EOS_TOKEN = "<|endoftext|>"
PAD_TOKEN = "<|pad|>"  # distinct from EOS, so masking padding never hides a real end
ROLE_NAMES = {"system": "System", "user": "User", "assistant": "Assistant"}


def format_prompt(prompt: str | list[dict]) -> str:
    """'User: …\\nAssistant:' for a string; each turn on its own line for a message list."""
    if isinstance(prompt, str):
        return f"User: {prompt}\nAssistant:"
    lines = []
    for m in prompt:
        end = EOS_TOKEN if m["role"] == "assistant" else ""
        lines.append(f"{ROLE_NAMES[m['role']]}: {m['content']}{end}")
    return "\n".join(lines) + "\nAssistant:"


def format_transcript(prompt: str | list[dict], response: str, *, end: bool = True) -> str:
    """Prompt and response as one text (a pretraining document); `end=False` omits EOS."""
    return format_prompt(prompt) + " " + response + (EOS_TOKEN if end else "")


def prompt_key(prompt: str | list[dict]) -> str:
    """A hashable identity for a prompt (message lists are rendered)."""
    return prompt if isinstance(prompt, str) else format_prompt(prompt)


# Jinja chat template stored in the tokenizer, rendering exactly what format_prompt does.
CHAT_TEMPLATE = (
    "{% for m in messages %}"
    "{% if m['role'] == 'system' %}System: {% elif m['role'] == 'user' %}User: {% else %}Assistant: {% endif %}"
    "{{ m['content'] }}{% if m['role'] == 'assistant' %}" + EOS_TOKEN + "{% endif %}"
    # newlines as expressions: HF renders templates with trim_blocks, which eats a newline after a tag
    "{% if not loop.last %}{{ '\\n' }}{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '\\nAssistant:' }}{% endif %}"
)
