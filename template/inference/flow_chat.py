"""The prompt flow node (flow.dag.yaml): one answer from the same engine as the chat scripts."""

import sys
from functools import cache
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from engine import Engine, conversation  # noqa: E402

try:  # promptflow is optional: the node is a plain function without it
    from promptflow.core import tool
except ImportError:

    def tool(func):  # type: ignore[no-redef]
        return func


@cache
def _engine() -> Engine:
    return Engine()


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
    return _engine().reply(conversation(history, question))


if __name__ == "__main__":
    import argparse

    parser = argparse.ArgumentParser(description="Run the prompt flow's node once, without promptflow.")
    parser.add_argument("question", nargs="?", default="We finally got the keys to our first home!")
    print(chat(parser.parse_args().question))
