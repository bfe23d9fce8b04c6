"""tuner/training/evaluation.py: how an answer is scored, and the report it prints. The whole evaluation,
base vs fine-tuned on a real model, is tests/test_finetune.py's."""

from __future__ import annotations

from pathlib import Path

import pytest
from tuner.training.evaluation import print_report, score


@pytest.mark.parametrize(
    ("answer", "expected", "exact", "mentioned"),
    [
        ("joy", "joy", True, True),
        ("  Joy \n(because the puppy...)", "joy", True, True),  # first line, case and spaces ignored
        ("The tone is joy.", "joy", False, True),
        ("sadness", "joy", False, False),
        ("", "joy", False, False),
    ],
)
def test_score(answer: str, expected: str, exact: bool, mentioned: bool) -> None:
    assert score(answer, expected) == {"exact_match": exact, "mentioned": mentioned}


def test_report_shows_base_and_tuned_side_by_side(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    metrics = {"exact_match": 0.5, "mentioned": 0.75, "answer_loss": 1.25, "perplexity": 3.49}
    report = {
        "held_out_rows": 4,
        "base": {**metrics, "exact_match": 0.0},
        "tuned": metrics,
        "examples": [{"input": "The puppy slept.", "base": "A puppy.", "tuned": "joy", "expected": "joy"}],
    }
    print_report(report, tmp_path / "models" / "adapter" / "eval.json", tmp_path)
    out = capsys.readouterr().out
    assert "Held-out evaluation: 4 rows the model never trained on" in out
    assert "exact match" in out and "0.0%" in out and "50.0%" in out and "3.49" in out
    assert "expected: 'joy'" in out and "Written to models/adapter/eval.json" in out
