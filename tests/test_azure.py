"""tuner/cloud/az.py, imported directly: az found on PATH, its JSON parsed, its failures one line
that names the command and none of its values, and the preflight checks."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
from tuner.cloud.az import Az, AzureError, first_error

# Answers with FAKE_AZ_REPLY ({"stdout", "stderr", "rc"}) and logs its argv and stdin to FAKE_AZ_LOG.
FAKE_AZ = """\
import json, os, sys
reply = json.loads(os.environ["FAKE_AZ_REPLY"])
with open(os.environ["FAKE_AZ_LOG"], "a") as f:
    f.write(json.dumps({"argv": sys.argv[1:], "stdin": sys.stdin.read()}) + "\\n")
out = reply.get("stdout", "")
sys.stdout.write(out if isinstance(out, str) else json.dumps(out))
sys.stderr.write(reply.get("stderr", ""))
sys.exit(reply.get("rc", 0))
"""


class FakeAz:
    def __init__(self, tmp: Path, monkeypatch: pytest.MonkeyPatch) -> None:
        bin_dir = tmp / "bin"
        bin_dir.mkdir()
        (bin_dir / "az").write_text(f"#!{sys.executable}\n{FAKE_AZ}", "utf-8")
        (bin_dir / "az").chmod(0o755)
        self.log = tmp / "az.log"
        self.monkeypatch = monkeypatch
        monkeypatch.setenv("PATH", str(bin_dir))
        monkeypatch.setenv("FAKE_AZ_LOG", str(self.log))
        self.reply()

    def reply(self, stdout: object = "", stderr: str = "", rc: int = 0) -> None:
        self.monkeypatch.setenv("FAKE_AZ_REPLY", json.dumps({"stdout": stdout, "stderr": stderr, "rc": rc}))

    def calls(self) -> list[dict]:
        return [json.loads(line) for line in self.log.read_text("utf-8").splitlines()]


@pytest.fixture
def fake(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> FakeAz:
    return FakeAz(tmp_path, monkeypatch)


@pytest.mark.parametrize(
    "stderr, expected",
    [
        ("WARNING: a warning\nERROR: (JobNotFound) no such job\nmore\n", "(JobNotFound) no such job"),
        ('ERROR: {"error": {"code": "Quota", "message": "not enough   cores"}}', "Quota: not enough cores"),
        ('ERROR: {"code": "InvalidTemplate", "message": "bad"}', "InvalidTemplate: bad"),
        ("something odd\nand more\n", "something odd"),
        ("", "exit status 3"),
        ("ERROR: " + "x" * 900, "x" * 500),
    ],
)
def test_first_error_is_the_line_that_says_what_went_wrong(stderr: str, expected: str) -> None:
    assert first_error(stderr, 3) == expected


def test_az_parses_json_and_takes_stdin(fake: FakeAz) -> None:
    fake.reply(stdout={"name": "x", "n": [1, 2]})
    assert Az()("group show -n", "rg-1", stdin="s3cret") == {"name": "x", "n": [1, 2]}
    (call,) = fake.calls()
    assert call["argv"] == ["group", "show", "-n", "rg-1", "-o", "json"] and call["stdin"] == "s3cret"
    fake.reply(stdout='"Restart succeeded"')
    assert Az()("containerapp revision restart") == "Restart succeeded"
    fake.reply(stdout="plain words")
    assert Az()("x") == "plain words"
    fake.reply(stdout="")
    assert Az()("x") is None


def test_az_adds_the_subscription_when_set(fake: FakeAz) -> None:
    Az("my-sub")("account show")
    Az("")("account show")
    assert [c["argv"] for c in fake.calls()] == [
        ["account", "show", "--subscription", "my-sub", "-o", "json"],
        ["account", "show", "-o", "json"],
    ]


def test_az_failure_names_the_command_not_its_values(fake: FakeAz) -> None:
    fake.reply(rc=1, stderr="ERROR: (Conflict) it exists\n")
    with pytest.raises(AzureError) as err:
        Az()("storage account keys list -g", "rg-private-name", "-n", "stprivate")
    assert str(err.value) == "`az storage account keys list` failed: (Conflict) it exists"


def test_az_missing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(AzureError, match="not installed or not on PATH"):
        Az().argv("account show")
    with pytest.raises(AzureError, match="not installed"):
        Az().login()


def test_login(fake: FakeAz) -> None:
    fake.reply(stdout={"id": "sub-id"})
    assert Az().login() == {"id": "sub-id"}
    fake.reply(rc=1, stderr="ERROR: Please run 'az login' to setup account.\n")
    with pytest.raises(AzureError, match=r"not logged in to Azure: run `az login`"):
        Az().login()


def test_gpu_profile_check_says_what_the_region_offers(fake: FakeAz) -> None:
    supported = [
        {"name": "Consumption"},
        {"name": "Consumption-GPU-NC24-A100"},
        {"name": "x", "properties": {"displayName": "Consumption-GPU-NC8as-T4"}},
    ]
    fake.reply(stdout=supported)
    Az().check_gpu_profile("swedencentral", "Consumption-GPU-NC8as-T4")  # found by its display name
    assert " ".join(fake.calls()[0]["argv"][:6]) == "containerapp env workload-profile list-supported -l swedencentral"
    fake.reply(stdout=supported[:2])
    with pytest.raises(AzureError) as err:
        Az().check_gpu_profile("swedencentral", "Consumption-GPU-NC8as-T4")
    message = str(err.value)
    assert "swedencentral has no serverless GPU profile Consumption-GPU-NC8as-T4" in message
    assert "(it offers Consumption-GPU-NC24-A100)" in message and "[azure] location in settings.toml" in message
