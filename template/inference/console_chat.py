"""Chat with the fine-tuned model in the terminal.

python inference/console_chat.py                      # multi-turn chat; #end, Ctrl-D or Ctrl-C quits
python inference/console_chat.py --prompt "I won!"    # one answer to stdout, for scripts
python inference/console_chat.py --baseonly           # the base model, without the adapter
"""

from __future__ import annotations

import io
import sys
from pathlib import Path
from typing import Any

from tuner.serving import load_engine
from tuner.serving.engine import ChatEngine, EngineError, conversation, is_text
from tuner.settings import WorkspaceError, check_value, run_script, script_parser, settings_for_script

ROOT = Path(__file__).resolve().parents[1]


# Python keeps input bytes undecodable in the terminal's encoding as lone surrogates (is_text).
NOT_TEXT = "that input is not valid text in the terminal's encoding"
DROPPED = "(older turns dropped to fit the context)"
OPTIONS = {"max_new_tokens": int, "temperature": float, "top_p": float, "top_k": int}


def fitting(
    engine: ChatEngine,
    history: list[dict[str, str]],
    text: str,
    settings: dict[str, Any],
    system: str | None,
    room: int,
) -> tuple[list[dict[str, str]], list[dict[str, str]]]:
    """(history, messages) for the new turn, the oldest exchanges dropped until the prompt leaves
    `room` tokens of the context for the answer; the system message stays, as conversation()
    adds it. A turn too long alone is left to the engine, which says so."""
    messages = conversation(history, text, settings, system)
    while history and len(engine.prompt_ids(messages)) + room > engine.context:
        history = history[2:]  # one user turn and its answer
        messages = conversation(history, text, settings, system)
    return history, messages


def main() -> None:
    parser = script_parser(__doc__, ROOT, "chat.temperature=0.7")
    parser.add_argument("--baseonly", action="store_true", help="chat with the base model, no adapter")
    parser.add_argument("--prompt", help="answer this one message and exit")
    parser.add_argument("--system", help="system message (default: the one the model was fine-tuned with)")
    # Generation options: the settings' [chat] table, unless given here (and then checked as it is).
    for option, kind in OPTIONS.items():
        parser.add_argument("--" + option.replace("_", "-"), type=kind, help=f"default: [chat] {option}")
    parser.add_argument("--backend", choices=["torch", "onnx", "gguf"], help="default: [chat] backend")
    args = parser.parse_args()
    if isinstance(sys.stdout, io.TextIOWrapper):
        # A terminal that cannot show a character (LANG=C, PYTHONIOENCODING=ascii) gets "?" for
        # it instead of a traceback; UTF-8 terminals show everything as before.
        sys.stdout.reconfigure(errors="replace")
    if args.prompt is not None and not is_text(args.prompt):
        raise WorkspaceError(NOT_TEXT)
    settings = settings_for_script(args.settings, args.overrides)
    options = {name: settings["chat"][name] for name in OPTIONS}
    for name in OPTIONS:
        if getattr(args, name) is not None:
            option = "--" + name.replace("_", "-")
            options[name] = check_value(settings, "chat", name, getattr(args, name), option)

    engine = load_engine(settings, ROOT, args.backend, args.baseonly)

    if args.prompt is not None:
        try:
            for piece in engine.stream(conversation([], args.prompt, settings, args.system), **options):
                print(piece, end="", flush=True)
        finally:
            print()  # end the answer's line, whole or not
        return

    print(f"Chatting with {engine.model_name}. Type #end (or Ctrl-D) to quit.")
    # Room kept for each answer: its limit, but never more than half the context, so that a large
    # max_new_tokens does not drop every earlier turn.
    room = min(options["max_new_tokens"], engine.context // 2)
    history: list[dict[str, str]] = []
    try:
        while True:
            try:
                text = input("\nYou: ").strip()
            except UnicodeDecodeError:
                text = "\udc80"  # bytes that are not text in the terminal's encoding
            if text == "#end":
                break
            if not text:
                continue
            if not is_text(text):
                print(f"error: {NOT_TEXT}; type it again")
                continue
            kept, messages = fitting(engine, history, text, settings, args.system, room)
            if len(kept) < len(history):
                print(DROPPED)
                history = kept
            print("Model: ", end="", flush=True)
            answer = ""
            try:
                for piece in engine.stream(messages, **options):
                    answer += piece
                    print(piece, end="", flush=True)
            except EngineError as err:  # this turn alone outgrew the context: say so, keep the chat
                print(f"\nerror: {err}")
                continue
            print()
            history += [{"role": "user", "content": text}, {"role": "assistant", "content": answer}]
    except (EOFError, KeyboardInterrupt):
        pass
    print("\nBye.")


if __name__ == "__main__":
    run_script(main)
