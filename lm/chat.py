"""Messages -> token ids, one way for every stage: training labels, evaluation prompts, serving prompts.

The chat template is the tokenizer's own; a tokenizer without one gets ChatML (`ensure_chat_template`),
in training and serving alike, so a model is always prompted exactly as it was trained.
"""

from __future__ import annotations

IGNORE = -100  # label value the loss skips

# ChatML: used only when a tokenizer ships no chat template (e.g. a bare base model).
DEFAULT_CHAT_TEMPLATE = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def ensure_chat_template(tokenizer) -> bool:
    """Give the tokenizer a ChatML template and a pad token if missing. Returns True if a template was added."""
    added = False
    if not getattr(tokenizer, "chat_template", None):
        tokenizer.chat_template = DEFAULT_CHAT_TEMPLATE
        added = True
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return added


def chat_ids(tokenizer, messages: list[dict], add_generation_prompt: bool) -> list[int]:
    """The chat template applied to `messages`, as token ids."""
    out = tokenizer.apply_chat_template(messages, tokenize=True, add_generation_prompt=add_generation_prompt,
                                        return_dict=True)
    return list(out["input_ids"])


def encode_chat(tokenizer, messages: list[dict]) -> tuple[list[int], list[int]]:
    """input_ids and labels; labels are IGNORE everywhere except assistant-turn tokens (incl. end-of-turn)."""
    ids = chat_ids(tokenizer, messages, False)
    labels = [IGNORE] * len(ids)
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        start = len(chat_ids(tokenizer, messages[:i], True))
        end = len(chat_ids(tokenizer, messages[: i + 1], False))
        labels[start:end] = ids[start:end]
    if all(x == IGNORE for x in labels):
        raise ValueError("chat template is not prefix-stable: no assistant tokens found")
    return ids, labels


def encode_generation_prompt(tokenizer, messages: list[dict]) -> list[int]:
    """The prompt a chat request sends to the model: the messages plus the assistant generation prompt."""
    return chat_ids(tokenizer, messages, True)


def encode_prompt(tokenizer, messages: list[dict]) -> list[int]:
    """Prompt of a dataset row: every turn before its last assistant turn, plus the generation prompt."""
    last = max(i for i, m in enumerate(messages) if m["role"] == "assistant")
    return encode_generation_prompt(tokenizer, messages[:last])


def encode_text(tokenizer, text: str) -> list[int]:
    """A raw completion prompt: the text's tokens, no special tokens added."""
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def loss_segments(tokenizer, messages: list[dict]) -> list[tuple[str, str, bool]]:
    """The trainer's encoding of a chat (encode_chat) cut into (role, text, carries loss) spans: each turn's
    tokens (template markup included), split where the loss mask changes. Shows what training learns from."""
    ids, labels = encode_chat(tokenizer, messages)
    out: list[tuple[str, str, bool]] = []
    start = 0
    for i, m in enumerate(messages):
        end = len(ids) if i == len(messages) - 1 else len(chat_ids(tokenizer, messages[: i + 1], False))
        j = start
        while j < end:
            loss = labels[j] != IGNORE
            k = j
            while k < end and (labels[k] != IGNORE) == loss:
                k += 1
            out.append((m["role"], tokenizer.decode(ids[j:k]), loss))
            j = k
        start = end
    return out
