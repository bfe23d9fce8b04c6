"""`copier update` from the last release to this one: a user's workspace, rendered and edited with
the release, moves to the new layout (tuner/ in training/, serving/ and cloud/), keeps the user's
settings.toml edits, and keeps no file of the old layout."""

from __future__ import annotations

import io
import re
import shutil
import subprocess
import tarfile
from pathlib import Path

import pytest
import yaml
from conftest import REPO, run_py

# The last release: the commit before tuner/ was split into layers (issue 20).
LAST_RELEASE = "9359d6dcc14392b99ef84ef6a66770e41ff9f06e"
ANSWERS = {"model": "tiny-random", "platform": "cpu", "mode": "both", "project_name": "mine"}


def git(cwd: Path, *args: str) -> str:
    return subprocess.run(["git", *args], cwd=cwd, check=True, capture_output=True, text=True).stdout


def release_tree(dst: Path) -> None:
    """The template as it was at LAST_RELEASE, from this repository's history."""
    archive = subprocess.run(
        ["git", "archive", "--format=tar", LAST_RELEASE, "copier.yml", "template", "includes"],
        cwd=REPO,
        capture_output=True,
    )
    assert archive.returncode == 0, f"the last release is not in this clone's history: {archive.stderr.decode()}"
    with tarfile.open(fileobj=io.BytesIO(archive.stdout)) as tar:
        tar.extractall(dst, filter="data")


def files(root: Path) -> set[str]:
    return {str(p.relative_to(root)) for p in root.rglob("*") if p.is_file() and ".git" not in p.parts}


@pytest.fixture(scope="module")
def updated(template_src: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, set[str]]:
    """(the updated workspace, a fresh render of this version, the files of the old render)."""
    from copier import run_copy, run_update

    tmp = tmp_path_factory.mktemp("update")
    tpl = tmp / "tpl"
    tpl.mkdir()
    release_tree(tpl)
    git(tpl, "init", "-q", "-b", "main")
    git(tpl, "add", "-A")
    git(tpl, "commit", "-qm", "last release")
    git(tpl, "tag", "v0.1.0")
    ws = tmp / "ws"
    run_copy(str(tpl), str(ws), data=ANSWERS, defaults=True, quiet=True, unsafe=False)
    old_files = files(ws)
    git(ws, "init", "-q", "-b", "main")
    git(ws, "add", "-A")
    git(ws, "commit", "-qm", "rendered")
    # The user's edits: two settings and a line of their own in the dataset.
    settings = ws / "settings.toml"
    text = settings.read_text("utf-8").replace("max_new_tokens = 128", "max_new_tokens = 42")
    settings.write_text(re.sub(r"(?m)^learning_rate = .*$", "learning_rate = 0.0003", text), "utf-8")
    git(ws, "commit", "-qam", "my settings")

    # This version, as the next release.
    for item in tpl.iterdir():
        if item.name != ".git":
            shutil.rmtree(item) if item.is_dir() else item.unlink()
    shutil.copytree(template_src, tpl, dirs_exist_ok=True)
    git(tpl, "add", "-A")
    git(tpl, "commit", "-qm", "this version")
    git(tpl, "tag", "v0.2.0")
    run_update(str(ws), defaults=True, overwrite=True, quiet=True, unsafe=False)
    fresh = run_copy(str(tpl), str(tmp / "fresh"), data=ANSWERS, defaults=True, quiet=True, unsafe=False)
    return ws, Path(fresh.dst_path), old_files


def test_the_release_had_the_old_layout(updated: tuple[Path, Path, set[str]]) -> None:
    _, _, old_files = updated
    assert {"tuner/api.py", "tuner/chat.py", "tuner/remote.py", "tuner/backends.py"} <= old_files


def test_update_leaves_no_file_of_the_old_layout(updated: tuple[Path, Path, set[str]]) -> None:
    ws, fresh, _ = updated
    assert files(ws) == files(fresh)
    assert not list((ws / "tuner").glob("*_engine.py"))
    assert (ws / "tuner" / "serving" / "api.py").is_file()


def test_update_keeps_the_users_settings(updated: tuple[Path, Path, set[str]]) -> None:
    ws, _, _ = updated
    text = (ws / "settings.toml").read_text("utf-8")
    assert "max_new_tokens = 42" in text and "learning_rate = 0.0003" in text
    assert "<<<<<<<" not in text and ">>>>>>>" not in text
    assert yaml.safe_load((ws / ".copier-answers.yml").read_text("utf-8"))["_commit"] == "v0.2.0"
    # Nothing conflicted anywhere, and the updated workspace's own settings check accepts it.
    conflicted = [p for p in files(ws) if re.search(r"(?m)^<<<<<<< ", (ws / p).read_text("utf-8", "ignore"))]
    assert conflicted == [] and not [p for p in files(ws) if p.endswith(".rej")]
    code = "from pathlib import Path; import tuner.settings as s; print(s.load_settings(Path('settings.toml'))['chat'])"
    run = run_py(ws, "-c", code)
    assert run.returncode == 0 and "'max_new_tokens': 42" in run.stdout, run.stderr[-2000:]
