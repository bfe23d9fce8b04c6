"""tuner/export/publish.py and card.py: an export pushed to a local stand-in for the Hugging Face
Hub's HTTP API (tests/hub_standin.py; huggingface_hub itself runs unchanged, HF_ENDPOINT pointed at
the stand-in) arrives byte for byte with its model card as README.md, its large files through Xet
storage (the default) and through Git LFS (HF_HUB_DISABLE_XET=1); a bad token, a namespace the
token may not write to, an unreachable Hub, offline mode, a Hub without Xet and a missing HF_TOKEN
are each one line and exit code 1 through the workspace's error path (run_script); the card
parses with huggingface_hub's own ModelCard and model-index parser, with the figures of a real fine-tune's eval.json."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import REPO, free_port
from hub_standin import LFS_MIN_SIZE, USER, HubStandIn
from huggingface_hub import ModelCard
from safetensors.numpy import save_file
from tuner.settings import load_settings

TOKEN = "hf_standin_secret_token_0123456789"
CARD = "---\nlicense: mit\nlibrary_name: transformers\n---\n\n# A card\n"
# What inference/export.py does with --push-to-hub, in a process of its own (as the command runs):
# push(), its URL printed, an ExportError through run_script (one line, exit code 1).
PUSH = """
import sys
from pathlib import Path
from tuner.export.publish import push
from tuner.settings import run_script
folder, repo_id, card, private = Path(sys.argv[1]), sys.argv[2], Path(sys.argv[3]).read_text("utf-8"), sys.argv[4]
run_script(lambda: print(push(folder, repo_id, card, private == "private")))
"""


def run_push(
    tmp_path: Path,
    folder: Path,
    repo_id: str,
    endpoint: str,
    token: str | None = TOKEN,
    card: str = CARD,
    private: bool = False,
    xet: bool = True,
    env: dict[str, str] | None = None,
) -> subprocess.CompletedProcess[str]:
    """The push in a process of its own, as a user runs it: huggingface_hub reads HF_ENDPOINT (and
    HF_HUB_DISABLE_XET, with xet=False: large files through Git LFS) when it is imported."""
    card_file = tmp_path / "card.md"
    card_file.write_text(card, "utf-8")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "HUGGING"))} | (env or {})
    env |= {"HF_ENDPOINT": endpoint, "PYTHONPATH": str(REPO / "template"), "HF_HOME": str(tmp_path / "hf-home")}
    env |= {"HF_HUB_DISABLE_PROGRESS_BARS": "1", "HF_XET_CLIENT_RETRY_MAX_ATTEMPTS": "1"}
    if not xet:
        env["HF_HUB_DISABLE_XET"] = "1"
    if token is not None:
        env["HF_TOKEN"] = token
    args = [str(folder), repo_id, str(card_file), "private" if private else "public"]
    return subprocess.run(
        [sys.executable, "-c", PUSH, *args], capture_output=True, text=True, timeout=300, env=env, cwd=tmp_path
    )


def export_folder(tmp_path: Path) -> Path:
    """An export as inference/export.py leaves it: small files, a nested one, and weights bigger
    than the Hub's LFS threshold."""
    folder = tmp_path / "models" / "exports" / "merged"
    (folder / "nested").mkdir(parents=True)
    (folder / "config.json").write_text(json.dumps({"model_type": "llama"}), "utf-8")
    (folder / "generation_config.json").write_text(json.dumps({"eos_token_id": [2, 7]}), "utf-8")
    (folder / "nested" / "notes.txt").write_text("héllo\n", "utf-8")
    # Weights as a fine-tune leaves them (float32: byte-grouped LZ4 in Xet), zeros (LZ4) and noise
    # (stored as it is), past the size from which the Hub puts any file in LFS.
    rng = np.random.default_rng(0)
    weights = {"w": rng.normal(0, 0.02, LFS_MIN_SIZE // 4).astype(np.float32), "zeros": np.zeros(50_000, np.float32)}
    weights["noise"] = np.frombuffer(os.urandom(400_000), np.uint8)
    save_file(weights, str(folder / "model.safetensors"))
    # Text that LZ4 compresses well, under a name the Hub keeps in LFS whatever its size.
    words = [f"▁word{i % 997}" for i in range(40_000)]
    (folder / "tokenizer.model").write_bytes(json.dumps(dict(enumerate(words))).encode())
    (folder / "README.md").write_text("an old card, replaced by the new one", "utf-8")
    return folder


@pytest.mark.parametrize("xet", [True, False], ids=["xet", "lfs"])
def test_push_arrives_byte_for_byte_with_the_card_as_readme(tmp_path: Path, xet: bool) -> None:
    folder = export_folder(tmp_path)
    with HubStandIn(TOKEN) as standin:
        done = run_push(tmp_path, folder, f"{USER}/my-model", standin.url, private=True, xet=xet)
        assert done.returncode == 0, done.stdout + done.stderr
        assert done.stdout.strip().splitlines()[-1] == f"{standin.url}/{USER}/my-model"
        repo = standin.hub.repos[f"{USER}/my-model"]
        assert repo.private
        sent = {p.relative_to(folder).as_posix(): p.read_bytes() for p in folder.rglob("*") if p.is_file()}
        sent["README.md"] = CARD.encode()
        assert {k: v for k, v in repo.files.items() if k != ".gitattributes"} == sent
        assert len(repo.commits) == 1 and repo.commits[0]["paths"] == sorted(sent)  # one commit, the card in it
        # The weights went to Xet storage (xorbs and a shard) or through the LFS batch API, never
        # inline in the commit, which names them by sha256.
        large = [(folder / name).read_bytes() for name in ("model.safetensors", "tokenizer.model")]
        assert sorted(standin.hub.lfs.values()) == sorted(large)
        paths = [path for _, path, _ in standin.hub.requests]
        assert (len(standin.hub.xorbs) > 0) is xet and ("/v1/shards" in paths) is xet
        assert any(path.startswith("/lfs-objects/") for path in paths) is not xet
        assert all(ok for _, _, ok in standin.hub.requests)  # every call carried the token (or the Xet one)

        # Pushed again (the repo exists: exist_ok), a changed file replaces the old one.
        (folder / "config.json").write_text(json.dumps({"model_type": "llama", "changed": True}), "utf-8")
        again = run_push(tmp_path, folder, f"{USER}/my-model", standin.url, card=CARD + "v2\n", xet=xet)
        assert again.returncode == 0, again.stdout + again.stderr
        assert repo.files["config.json"] == (folder / "config.json").read_bytes()
        assert repo.files["README.md"] == (CARD + "v2\n").encode() and len(repo.commits) == 2
    assert TOKEN not in done.stdout + done.stderr + again.stdout + again.stderr
    assert not list((tmp_path / "hf-home").rglob("*token*"))  # never written anywhere


def test_a_bad_token_is_one_line_and_exit_code_1(tmp_path: Path) -> None:
    folder = export_folder(tmp_path)
    with HubStandIn(TOKEN) as standin:
        done = run_push(tmp_path, folder, f"{USER}/my-model", standin.url, token="hf_wrong")
    assert done.returncode == 1
    assert done.stderr.startswith("error: the Hub refused HF_TOKEN (401") and done.stderr.count("\n") == 1
    assert "Traceback" not in done.stderr and "hf_wrong" not in done.stderr
    assert standin.hub.repos == {}


def test_a_namespace_the_token_may_not_write_to_is_one_line(tmp_path: Path) -> None:
    folder = export_folder(tmp_path)
    with HubStandIn(TOKEN) as standin:
        done = run_push(tmp_path, folder, "someone-else/my-model", standin.url)
    assert done.returncode == 1 and done.stderr.count("\n") == 1, done.stderr
    assert done.stderr.startswith("error: HF_TOKEN may not write to someone-else/my-model (403")
    assert standin.hub.repos == {}


def test_no_token_is_refused_before_any_request(tmp_path: Path) -> None:
    folder = export_folder(tmp_path)
    with HubStandIn(TOKEN) as standin:
        done = run_push(tmp_path, folder, f"{USER}/my-model", standin.url, token=None)
        blank = run_push(tmp_path, folder, f"{USER}/my-model", standin.url, token="  ")
    for result in (done, blank):
        assert result.returncode == 1 and result.stderr.count("\n") == 1, result.stderr
        assert result.stderr.startswith("error: --push-to-hub needs a write token in HF_TOKEN")
    assert standin.hub.requests == []


def test_an_unreachable_hub_is_one_line(tmp_path: Path) -> None:
    done = run_push(tmp_path, export_folder(tmp_path), f"{USER}/my-model", f"http://127.0.0.1:{free_port()}")
    assert done.returncode == 1 and done.stderr.count("\n") == 1, done.stderr
    assert done.stderr.startswith("error: cannot reach the Hub at http://127.0.0.1:")


def test_offline_mode_is_one_line(tmp_path: Path) -> None:
    """HF_HUB_OFFLINE=1 (set for the download scripts, say) stops the push before it starts."""
    with HubStandIn(TOKEN) as standin:
        done = run_push(tmp_path, export_folder(tmp_path), f"{USER}/m", standin.url, env={"HF_HUB_OFFLINE": "1"})
    assert done.returncode == 1 and done.stderr.count("\n") == 1, done.stderr
    assert done.stderr.startswith("error: cannot push to the Hub while HF_HUB_OFFLINE is set")
    assert [path for _, path, _ in standin.hub.requests] == []


def test_a_hub_without_xet_says_how_to_push_through_lfs(tmp_path: Path) -> None:
    with HubStandIn(TOKEN, xet=False) as standin:
        done = run_push(tmp_path, export_folder(tmp_path), f"{USER}/m", standin.url)
    assert done.returncode == 1 and done.stderr.count("\n") == 1, done.stderr
    assert done.stderr.startswith(f"error: cannot reach the Hub at {standin.url} to push {USER}/m:")
    assert done.stderr.endswith("set HF_HUB_DISABLE_XET=1 to upload through Git LFS)\n")


def test_metadata_the_hub_refuses_is_one_line_before_any_upload(tmp_path: Path) -> None:
    with HubStandIn(TOKEN) as standin:
        done = run_push(tmp_path, export_folder(tmp_path), f"{USER}/m", standin.url, card="---\nlicense: nope\n---\n")
    assert done.returncode == 1 and done.stderr.count("\n") == 1, done.stderr
    assert done.stderr.startswith("error: push to tester/m refused: Invalid metadata in README.md: ")
    assert "license" in done.stderr
    assert standin.hub.lfs == {} and standin.hub.repos[f"{USER}/m"].commits == []


# ---------------------------------------------------------------------------------- the card


@pytest.fixture(scope="module")
def carded(tuned_workspace: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A copy of the fine-tuned tiny-random workspace (a real run.json and eval.json), with the
    figure an export's check records in eval.json["exports"] (tuner/export/check.py's format)."""
    ws = tmp_path_factory.mktemp("carded") / "ws"
    shutil.copytree(tuned_workspace, ws, ignore=shutil.ignore_patterns("checkpoints", "olive-cache", "runs"))
    path = ws / "models" / "adapter" / "eval.json"
    report = json.loads(path.read_text("utf-8"))
    report["exports"] = {"merged": {"exact_match": 0.125, "mentioned": 0.25, "rows": report["held_out_rows"]}}
    path.write_text(json.dumps(report), "utf-8")
    return ws


def figures(card: ModelCard) -> dict[str, float]:
    """model-index as huggingface_hub parses it: metric name -> value."""
    return {r.metric_name: r.metric_value for r in card.data.eval_results}


def test_the_card_of_a_real_run_parses_and_carries_its_figures(carded: Path) -> None:
    from tuner.export.card import model_card

    settings = load_settings(carded / "settings.toml")
    report = json.loads((carded / "models" / "adapter" / "eval.json").read_text("utf-8"))
    run = json.loads((carded / "models" / "adapter" / "run.json").read_text("utf-8"))
    card = ModelCard(model_card(settings, carded, "merged", repo_id=f"{USER}/tiny"))
    data = card.data
    assert data.license == "mit" == run["settings"]["model"]["license"]  # catalog -> settings.toml -> run.json
    assert data.library_name == "transformers" and data.base_model_relation == "finetune"
    assert data.base_model is None  # tiny-random is built offline: no Hub repo to point at
    assert data.pipeline_tag == "text-generation" and {"lora", "merged"} <= set(data.tags)
    assert data.model_name == f"{USER}/tiny"
    got = figures(card)
    for name, title in [
        ("base", "base model"),
        ("prompted", "base model, prompted"),
        ("tuned", "fine-tuned (adapter)"),
    ]:
        assert got[f"exact match, {title}"] == report[name]["exact_match"]
        assert got[f"answer mentioned, {title}"] == report[name]["mentioned"]
        assert got[f"perplexity, {title}"] == report[name]["perplexity"]
    assert got["exact match, this export (merged)"] == 0.125 and got["answer mentioned, this export (merged)"] == 0.25
    assert {r.dataset_split for r in data.eval_results} == {"held-out"}
    # The body: what was trained, on what, the table, how to use it.
    text = card.text
    train = run["settings"]["train"]
    assert f"| LoRA r / alpha / dropout | {train['lora_r']} / {train['lora_alpha']} / {train['lora_dropout']} |" in text
    held = report["held_out_rows"]
    assert f"{held} held out" in text and "sample dataset" in text
    assert f"| this export (merged) | {100 * 0.125:.1f}% |" in text
    assert f'pipeline("text-generation", model="{USER}/tiny")' in text and "## Limitations" in text


def test_the_card_of_each_format_names_its_library(carded: Path) -> None:
    from tuner.export.card import model_card

    settings = load_settings(carded / "settings.toml")
    adapter = ModelCard(model_card(settings, carded, "adapter"))
    assert adapter.data.library_name == "peft" and adapter.data.base_model_relation == "adapter"
    assert "PeftModel.from_pretrained" in adapter.text
    assert "this export" not in str(adapter.data.eval_results)  # no check recorded for it: no row
    gguf = ModelCard(model_card(settings, carded, "gguf-q4_k_m", repo_id=f"{USER}/tiny-gguf"))
    assert gguf.data.library_name == "gguf" and "q4_k_m" in gguf.data.tags
    assert (
        f"llama-server -hf {USER}/tiny-gguf:Q4_K_M" in gguf.text
        and f"ollama run hf.co/{USER}/tiny-gguf:Q4_K_M" in gguf.text
    )


def test_a_hub_model_and_dataset_are_named_in_the_card_and_it_is_pushed(
    carded: Path, render_factory, tmp_path: Path
) -> None:
    """SmolLM2 on a Hub dataset (rendered, not trained: the run.json is its settings as a run writes
    them, the figures those of the real tiny run): base_model, license and datasets point at the Hub."""
    from tuner.export.card import model_card

    ws = tmp_path / "ws"
    shutil.copytree(
        render_factory(
            model="HuggingFaceTB/SmolLM2-135M-Instruct",
            platform="cpu",
            mode="local",
            dataset_source="huggingface",
            dataset_hf_id="dair-ai/emotion",
            input_columns=["text"],
            target_column="label",
        ),
        ws,
    )
    settings = load_settings(ws / "settings.toml")
    (ws / "models").mkdir(exist_ok=True)
    shutil.copytree(carded / "models" / "adapter", ws / "models" / "adapter")
    (ws / "models" / "adapter" / "run.json").write_text(json.dumps({"settings": settings, "complete": True}), "utf-8")
    text = model_card(settings, ws, "merged", repo_id=f"{USER}/smol")
    data = ModelCard(text).data
    assert data.base_model == "HuggingFaceTB/SmolLM2-135M-Instruct" and data.license == "apache-2.0"
    assert data.datasets == ["dair-ai/emotion"]
    assert {r.dataset_type for r in data.eval_results} == {"dair-ai/emotion"}
    assert "[dair-ai/emotion](https://huggingface.co/datasets/dair-ai/emotion)" in text

    # The Hub's metadata check passes, and the card arrives as README.md.
    folder = export_folder(tmp_path)
    with HubStandIn(TOKEN) as standin:
        done = run_push(tmp_path, folder, f"{USER}/smol", standin.url, card=text)
    assert done.returncode == 0, done.stderr
    assert standin.hub.repos[f"{USER}/smol"].files["README.md"] == text.encode()
