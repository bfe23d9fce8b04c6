"""What a fine-tuning run shows while it works: one progress bar (steps done / total, the last
loss, elapsed and time left), with the libraries' own log lines sent to a file instead.

Both trainers make a transformers Trainer: train_sft.py makes its own, and Olive's LoRA pass
makes one in this process with no way to hand it callbacks. transformers picks the Trainer's
progress callback from one module attribute when a Trainer is made, so trainer_progress() swaps
TrainingBar in there for the length of a run, for both.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm
from transformers import TrainerCallback


class TrainingBar(TrainerCallback):
    """One bar for a Trainer's run, in the first process only. The numbers transformers prints
    at every logging step are left out: they are in log_history.json and TensorBoard."""

    def __init__(self) -> None:
        self.bar: Any = None
        self.shown: dict[str, str] = {}

    def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if state.is_world_process_zero:
            # initial: a resumed run starts where its checkpoint was, and the time left counts
            # only the steps of this session.
            self.bar = tqdm(
                total=state.max_steps, initial=state.global_step, desc="Fine-tuning", unit="step", dynamic_ncols=True
            )

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if self.bar is not None:
            self.bar.update(state.global_step - self.bar.n)

    def on_prediction_step(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if self.bar is not None:  # the held-out loss every eval_steps: the bar says why it waits
            self.bar.set_description("Fine-tuning (eval loss)", refresh=False)

    def on_log(self, args: Any, state: Any, control: Any, logs: dict[str, Any] | None = None, **kwargs: Any) -> None:
        if self.bar is not None and logs:
            self.shown |= {key: f"{logs[key]:.3f}" for key in ("loss", "eval_loss") if key in logs}
            self.bar.set_description("Fine-tuning", refresh=False)
            self.bar.set_postfix(self.shown)

    def on_train_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None


@contextmanager
def trainer_progress() -> Iterator[None]:
    """Every Trainer made inside shows TrainingBar instead of transformers' bar and log lines."""
    import transformers.trainer

    before = transformers.trainer.DEFAULT_PROGRESS_CALLBACK
    transformers.trainer.DEFAULT_PROGRESS_CALLBACK = TrainingBar
    try:
        yield
    finally:
        transformers.trainer.DEFAULT_PROGRESS_CALLBACK = before


@contextmanager
def logs_to(path: Path) -> Iterator[None]:
    """Olive's log, every library's log messages and Python's warnings go to `path` (appended)
    instead of the terminal, for the length of the block; an error still ends the run with its
    own message."""
    import transformers.utils.logging as hf_logging

    path.parent.mkdir(parents=True, exist_ok=True)
    handler = logging.FileHandler(path, encoding="utf-8")
    handler.setFormatter(logging.Formatter("[%(asctime)s] [%(levelname)s] [%(name)s] %(message)s"))
    root, olive = logging.getLogger(), logging.getLogger("olive")
    olive_handlers = olive.handlers[:]  # Olive prints to stdout with a handler of its own
    olive.handlers = [handler]
    root.addHandler(handler)  # the other libraries' loggers, and warnings (captureWarnings)
    hf_logging.disable_default_handler()  # transformers' logger has its own too
    hf_logging.add_handler(handler)
    hf_logging.disable_progress_bar()  # the bars of loading the weights
    logging.captureWarnings(True)
    try:
        yield
    finally:
        logging.captureWarnings(False)
        olive.handlers = olive_handlers
        root.removeHandler(handler)
        hf_logging.remove_handler(handler)
        hf_logging.enable_default_handler()
        hf_logging.enable_progress_bar()
        handler.close()
