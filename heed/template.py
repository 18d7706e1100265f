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


def format_turns(turns: list[dict]) -> str:
    """Turns that continue a prompt (the assistant's first, the assistant's last: a, user, a,
    ...) as one response text. A multi-turn response renders like the whole dialogue:
    format_transcript(prompt, format_turns(turns)) == format_transcript(prompt + turns[:-1],
    turns[-1]["content"]), because the text after the prompt's "Assistant:" is the same."""
    if not turns or turns[0]["role"] != "assistant" or turns[-1]["role"] != "assistant":
        raise ValueError("a response's turns must start and end with the assistant's")
    if len(turns) == 1:
        return turns[0]["content"]
    # format_prompt(turns[:-1]) is "Assistant: a<EOS>\n...\nAssistant:"; drop the first role name
    return format_prompt(turns[:-1])[len(ROLE_NAMES["assistant"]) + 2:] + " " + turns[-1]["content"]


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
