"""The prompt flow node (flow.dag.yaml): one answer from the same engine as the chat scripts."""

from functools import cache
from pathlib import Path

from tuner.backends import load_engine
from tuner.chat import ChatEngine, conversation
from tuner.settings import settings_for_script

ROOT = Path(__file__).resolve().parents[1]

try:  # promptflow is optional: the node is a plain function without it
    from promptflow.core import tool
except ImportError:

    def tool(func):  # type: ignore[no-redef]
        return func


@cache
def _engine() -> ChatEngine:
    """Loaded at the first question, with the backend settings.toml names."""
    return load_engine(settings_for_script(ROOT / "settings.toml"), ROOT)


@tool
def chat(question: str, chat_history: list | None = None) -> str:
    """Answer `question`, given earlier turns as promptflow's chat_history or chat messages."""
    history: list[dict[str, str]] = []
    for turn in chat_history or []:
        if "role" in turn:
            history.append({"role": turn["role"], "content": turn["content"]})
        else:  # promptflow chat history: turns with "inputs" and "outputs" dicts
            history.append({"role": "user", "content": turn["inputs"]["question"]})
            history.append({"role": "assistant", "content": turn["outputs"]["answer"]})
    engine = _engine()
    return engine.reply(conversation(history, question, engine.settings))


if __name__ == "__main__":
    import argparse

    parser = argparse.ArgumentParser(description="Run the prompt flow's node once, without promptflow.")
    parser.add_argument("question", nargs="?", default="We finally got the keys to our first home!")
    print(chat(parser.parse_args().question))
