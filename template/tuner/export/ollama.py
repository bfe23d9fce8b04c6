"""Ollama's Modelfile for the GGUF export: FROM, the chat template as Ollama's TEMPLATE, SYSTEM,
the end-of-turn stops and the [chat] sampling defaults.

Ollama formats a chat with a Go text/template, not with the model's Jinja chat template: a
Modelfile whose TEMPLATE is not exactly what the model was fine-tuned on makes a model that
"was fine in training" ramble in Ollama. So the TEMPLATE is read off the model's own chat
template: rendered for marker conversations, it gives the exact text before the system message,
between the turns and after the last one (the generation prompt). Every family of the catalog has
one of two shapes: the system message as a turn of its own (ChatML: Qwen2.5, SmolLM2; Phi-3,
Phi-3.5, Phi-4-mini and tiny-random; Llama 3.x, its date lines included), or put before the last
user message (Mistral v0.3). A template of another shape is refused with one line, and the
TEMPLATE is checked against the chat template on sample conversations before it is written.
tests/ renders it with Go's own text/template, the way Ollama does.

The user turns get [prompt] text_template around them, as in training and in the workspace's
chat: people type the bare input into `ollama run`.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from tuner.data import user_message
from tuner.export import ExportError
from tuner.serving.engine import END_TOKENS

# Markers for the contents of a probe conversation: no spaces (templates trim contents), no braces.
S, U1, A1, U2, BOS, EOS = "[[S]]", "[[U1]]", "[[A1]]", "[[U2]]", "[[BOS]]", "[[EOS]]"
# Conversations the TEMPLATE must reproduce exactly (Ollama's .System is the system message).
CHECKS: list[tuple[str, list[str]]] = [
    ("You are terse.", ["Hello there.", "Hi! How can I help?", "Name a colour.", "Blue.", "Another one?"]),
    ("You are terse.", ["Hello there."]),
    ("", ["Hello there.", "Hi! How can I help?", "Name a colour."]),
    ("", ["Hello there."]),
]


def render(chat_template: str, messages: list[dict[str, str]], bos: str = BOS, eos: str = EOS) -> str:
    """The chat template rendered as transformers renders it (same Jinja sandbox, extensions and
    functions), with the generation prompt."""
    from jinja2.ext import loopcontrols
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message: str) -> None:
        raise ExportError(f"the chat template refuses the conversation: {message}")

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols])
    env.filters["tojson"] = lambda x, indent=None: json.dumps(x, ensure_ascii=False, indent=indent)
    env.globals.update(raise_exception=raise_exception, strftime_now=lambda f: datetime.now().strftime(f))
    template = env.from_string(chat_template)
    return template.render(messages=messages, add_generation_prompt=True, bos_token=bos, eos_token=eos)


def conversation(system: str, turns: list[str]) -> list[dict[str, str]]:
    roles = ["user", "assistant"] * len(turns)
    return ([{"role": "system", "content": system}] if system else []) + [
        {"role": role, "content": text} for role, text in zip(roles, turns, strict=False)
    ]


@dataclass(frozen=True)
class Shape:
    """The text a chat template puts around the contents of a conversation."""

    no_system: str  # before the first user turn, when there is no system message
    system_before: str  # before the system message (system as a turn of its own)
    system_after: str  # between the system message and the first user turn
    in_last_user: str | None  # Mistral: the system message goes before the last user turn, then this
    user_after: str  # between a user turn and the answer
    assistant_after: str  # between an answer and the next user turn
    last_user_after: str  # after the last user turn: the generation prompt

    def text(self, system: str, turns: list[str]) -> str:
        """The conversation as this shape writes it, the way the Go TEMPLATE does."""
        own_turn = system and self.in_last_user is None
        out = self.system_before + system + self.system_after if own_turn else self.no_system
        for i, content in enumerate(turns):
            last = i == len(turns) - 1
            if i % 2 == 0:  # user
                if last and system and self.in_last_user is not None:
                    content = system + self.in_last_user + content
                out += content + (self.last_user_after if last else self.user_after)
            else:
                out += content + ("" if last else self.assistant_after)
        return out


def shape(chat_template: str, eos_token: str) -> Shape:
    """The Shape of the chat template, read from marker conversations. A leading BOS is left
    out: llama.cpp (Ollama's runner) adds it from the GGUF's own add_bos_token."""

    def probe(system: str, turns: list[str]) -> str:
        text = render(chat_template, conversation(system, turns), eos=eos_token)
        return text.removeprefix(BOS)

    def between(text: str, start: str, end: str) -> str:
        return text[text.index(start) + len(start) : text.index(end)]

    full, plain = probe(S, [U1, A1, U2]), probe("", [U1, A1, U2])
    found = [m for m in (S, U1, A1, U2) if m in full]
    order = sorted(found, key=full.index)
    if found != order and order != [U1, A1, S, U2] or any(full.count(m) != 1 for m in found) or BOS in full:
        raise ExportError("cannot write an Ollama TEMPLATE for this chat template: it is not a turn-by-turn template")
    user_after, tail = between(plain, U1, A1), plain[plain.index(U2) + len(U2) :]
    if S not in full:  # a template that drops system messages (an early Phi-3)
        return Shape(plain[: plain.index(U1)], "", "", None, user_after, between(plain, A1, U2), tail)
    if order == [U1, A1, S, U2]:  # Mistral
        return Shape(full[: full.index(U1)], "", "", between(full, S, U2), user_after, between(full, A1, S), tail)
    return Shape(
        plain[: plain.index(U1)],
        full[: full.index(S)],
        between(full, S, U1),
        None,
        user_after,
        between(full, A1, U2),
        tail,
    )


def go(action: str) -> str:
    """A Go template action, `{` `{ action }` `}`. The braces are joined here rather than written
    out, so that the template's render check can refuse every other double brace in a .py file."""
    return "{" * 2 + f" {action} " + "}" * 2


def branch(condition: str, then: str, otherwise: str = "") -> str:
    """A Go template `if`; no trim markers (a dash inside the braces), which would eat the newlines."""
    return go(f"if {condition}") + then + (go("else") + otherwise if otherwise else "") + go("end")


def go_template(form: Shape, user: list[str]) -> str:
    """The Go text/template of Ollama for the shape. Ollama hands it .System (the system
    messages) and .Messages (every message, system ones too, with .Role and .Content); the
    answer is generated after it. `user` is [prompt] text_template split at the input."""
    last = "(eq (len (slice $.Messages $i)) 1)"  # the message $i is the last one
    content = go(".Content").join(user)
    if form.in_last_user is not None:  # Mistral
        start = form.no_system
        content = branch(f"and $.System {last}", go("$.System") + form.in_last_user) + content
    elif form.system_before or form.system_after:
        start = branch(".System", form.system_before + go(".System") + form.system_after, form.no_system)
    else:  # the template drops system messages
        start = form.no_system
    after_user = form.user_after
    if form.last_user_after != form.user_after:  # the generation prompt differs from an answer's start
        after_user = branch(last, form.last_user_after, form.user_after)
    user_turn = content + after_user
    answer = go(".Content") + branch(f"not {last}", form.assistant_after)
    turn = go('if eq .Role "user"') + user_turn + go('else if eq .Role "assistant"') + answer + go("end")
    return start + go("range $i, $_ := .Messages") + turn + go("end")


def stops(chat_template: str, form: Shape, eos_token: str) -> list[str]:
    """Every end-of-turn token of the template: those of the catalog it writes, and EOS where it
    ends answers with it (Mistral's </s>)."""
    found = [t for t in END_TOKENS if t in chat_template]
    if EOS in form.assistant_after:
        found.append(eos_token)
    return list(dict.fromkeys(found))


def quoted(text: str, what: str) -> str:
    """A Modelfile's triple-quoted text, which has no escapes."""
    if '"""' in text:
        raise ExportError(f'{what} contains """, which a Modelfile cannot hold')
    return f'"""{text}"""'


def modelfile(settings: dict[str, Any], gguf_name: str, chat_template: str, eos_token: str = "</s>") -> str:
    """The Modelfile for the GGUF file `gguf_name` (beside it), from the model's chat template.
    `eos_token` is the model's EOS text, for templates that end each answer with it (Mistral)."""
    form = shape(chat_template, EOS)
    # [prompt] text_template, split where the typed input goes (a marker without braces).
    user = user_message("\x00", settings).split("\x00")
    for system, turns in CHECKS:
        messages = conversation(system, turns)
        want = render(chat_template, messages, bos="", eos=eos_token)
        got = form.text(system, turns).replace(EOS, eos_token)
        if got != want:
            raise ExportError("cannot write an Ollama TEMPLATE for this chat template: it writes turns unevenly")
    template = go_template(form, user).replace(EOS, eos_token)
    chat, system = settings["chat"], settings["prompt"]["system"]
    lines = [
        "# Ollama: ollama create NAME -f Modelfile, then ollama run NAME (written by inference/export.py)",
        f"FROM ./{gguf_name}",
        f"TEMPLATE {quoted(template, 'the chat template')}",
    ]
    if system:
        lines.append(f"SYSTEM {quoted(system, '[prompt] system')}")
    lines += [f"PARAMETER stop {json.dumps(stop)}" for stop in stops(chat_template, form, eos_token)]
    lines += [
        f"PARAMETER temperature {chat['temperature']}",
        f"PARAMETER top_p {chat['top_p']}",
        f"PARAMETER top_k {chat['top_k']}",
        f"PARAMETER num_predict {chat['max_new_tokens']}",
    ]
    return "\n".join(lines) + "\n"
