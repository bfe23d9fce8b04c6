"""vLLM's command line and chat request (tuner/serving/vllm.py, tuner/serving/upstream.py) against vLLM's own
code, the version in includes/versions.yml, on CPU.

The wheel is downloaded once into ~/.cache/copier-finetune/vllm-<version>/ (reused when there) and
installed there without its dependencies. A child Python (this one, with that folder and a few
small packages vLLM imports first on its path) imports from it:
- vllm.entrypoints.common.cli_args.make_arg_parser: the parser `vllm serve` builds its subcommand
  with (vllm/entrypoints/cli/serve.py); our command line is parsed by it, its --dtype and
  --max-lora-rank choices enforced;
- vllm.model_executor.layers.quantization.QUANTIZATION_METHODS: what --quantization may name;
- vllm.entrypoints.openai.chat_completion.protocol.ChatCompletionRequest: the fields of the
  request we send, and the sampling parameters vLLM makes of it.
The `serve` CLI itself imports vLLM's engine (CUDA kernels), so the entry point is read from the
wheel instead: the `vllm` console script's module (entry_points.txt) and the subcommand name
(ServeSubcommand.name in vllm/entrypoints/cli/serve.py).
Skipped only when pip cannot reach the package index.
"""

from __future__ import annotations

import ast
import configparser
import json
import os
import subprocess
import sys
import zipfile
from pathlib import Path
from typing import Any

import pytest
import yaml
from conftest import REPO
from packaging.requirements import Requirement
from test_vllm import GPU, fake_vllm_python, workspace
from tuner.serving import vllm
from tuner.serving.engine import Job
from tuner.serving.upstream import OpenAIEngine
from tuner.settings import load_settings
from tuner.training.precision import Device

VERSION = yaml.safe_load((REPO / "includes" / "versions.yml").read_text("utf-8"))["vllm"]
CACHE = Path(os.environ.get("XDG_CACHE_HOME", "~/.cache")).expanduser() / "copier-finetune" / f"vllm-{VERSION}"
# What importing the parser and the protocol needs beyond this environment (found by trying), at
# the versions the wheel requires; aiohttp's own dependencies after it.
IMPORT_DEPS = (
    "aiohttp cachetools cbor2 cloudpickle llguidance msgspec multidict openai-harmony partial-json-parser "
    "prometheus-client py-cpuinfo pybase64 pyzmq uvloop watchfiles xgrammar apache-tvm-ffi"
).split()
AIOHTTP_DEPS = ["aiohappyeyeballs", "aiosignal", "frozenlist", "propcache", "yarl"]
OFFLINE = ("NewConnectionError", "Could not fetch URL", "Temporary failure in name resolution", "ProxyError")

# Runs in the child: the JSON on stdin is {"subcommand": "serve", "commands": [argv after
# `python -m MODULE`], "bodies": [chat request]}.
PROBE = """
import argparse, contextlib, io, json, sys
from vllm.entrypoints.common.cli_args import make_arg_parser
from vllm.entrypoints.openai.chat_completion.protocol import ChatCompletionRequest
from vllm.model_executor.layers.quantization import QUANTIZATION_METHODS
from vllm.utils.argparse_utils import FlexibleArgumentParser

given = json.load(sys.stdin)
root = FlexibleArgumentParser()
serve = make_arg_parser(root.add_subparsers(dest="subparser").add_parser(given["subcommand"]))
choices = {a.dest: a.choices for a in serve._actions}
parsed = []
for argv in given["commands"]:
    err = io.StringIO()
    try:
        with contextlib.redirect_stderr(err):
            args = root.parse_args(argv)
    except SystemExit:
        parsed.append({"error": err.getvalue().strip().splitlines()[-1]})
        continue
    keys = ("subparser", "model_tag", "dtype", "quantization", "max_lora_rank", "enable_lora", "host", "port")
    parsed.append({k: getattr(args, k) for k in keys} | {"lora_modules": [m.name for m in args.lora_modules or []]})
fields = ChatCompletionRequest.model_fields
requests = []
for body in given["bodies"]:
    request = ChatCompletionRequest(**body)
    # A model whose generation_config.json sets top_k: vLLM's server defaults under the request's.
    sampling = request.to_sampling_params(256, {"top_k": 20})  # 256: any token limit
    requests.append({
        "unknown": sorted(set(body) - set(fields)),
        "deprecated": sorted(k for k in body if k in fields and fields[k].deprecated),
        "top_k": sampling.top_k,
        "max_completion_tokens": request.max_completion_tokens,
    })
json.dump({
    "parsed": parsed,
    "dtypes": choices["dtype"],
    "ranks": choices["max_lora_rank"],
    "quantizations": QUANTIZATION_METHODS,
    "requests": requests,
}, sys.stdout)
"""


def pip(*args: str) -> None:
    """pip with this Python; skips the test when the package index cannot be reached."""
    result = subprocess.run([sys.executable, "-m", "pip", *args], capture_output=True, text=True, timeout=1800)
    if result.returncode != 0:
        output = result.stdout + result.stderr
        if any(sign in output for sign in OFFLINE):
            pytest.skip(f"pip cannot reach the package index to get vLLM {VERSION}: {output.strip().splitlines()[-1]}")
        raise AssertionError(f"pip {' '.join(args)} failed:\n{output}")


@pytest.fixture(scope="module")
def wheel() -> Path:
    found = sorted(CACHE.glob(f"vllm-{VERSION}-*.whl"))
    if not found:
        pip("download", "--no-deps", "--only-binary=:all:", "--dest", str(CACHE), f"vllm=={VERSION}")
        found = sorted(CACHE.glob(f"vllm-{VERSION}-*.whl"))
    return found[0]


@pytest.fixture(scope="module")
def site(wheel: Path) -> Path:
    """The wheel and the packages its parser and protocol import, installed under CACHE."""
    site, done = CACHE / "site", CACHE / "site.complete"
    if not done.exists():
        with zipfile.ZipFile(wheel) as whl:
            metadata = whl.read(f"vllm-{VERSION}.dist-info/METADATA").decode()
        required = {}
        for line in metadata.splitlines():
            if line.startswith("Requires-Dist:"):
                req = Requirement(line.removeprefix("Requires-Dist:").strip())
                if req.marker is None or req.marker.evaluate({"extra": ""}):
                    required[req.name.lower()] = f"{req.name}{req.specifier}"
        deps = [required.get(name, name) for name in IMPORT_DEPS] + AIOHTTP_DEPS
        # The name vLLM's metadata gives openai_harmony's package (oss-harmony) is not on every index.
        deps = [d for d in deps if not d.startswith("oss-harmony")]
        args = ("install", "--no-deps", "--no-compile", "--upgrade", "--target", str(site))
        pip(*args, str(wheel), *deps)
        done.touch()
    return site


def vllm_says(site: Path, commands: list[list[str]], bodies: list[dict[str, Any]]) -> dict[str, Any]:
    # cwd: not one holding a folder named vllm, which `import vllm` would find first.
    # VLLM_TARGET_DEVICE: the parser's defaults ask the platform, and this machine may have no GPU.
    env = {**os.environ, "PYTHONPATH": str(site), "VLLM_TARGET_DEVICE": "cpu", "VLLM_LOGGING_LEVEL": "ERROR"}
    given = json.dumps({"subcommand": serve_subcommand(site), "commands": commands, "bodies": bodies})
    result = subprocess.run(
        [sys.executable, "-c", PROBE], input=given, capture_output=True, text=True, env=env, cwd=site, timeout=300
    )
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def console_script(site: Path) -> str:
    """The module of the `vllm` command (entry_points.txt), as `python -m` runs it."""
    entry_points = configparser.ConfigParser()
    entry_points.read_string((site / f"vllm-{VERSION}.dist-info" / "entry_points.txt").read_text("utf-8"))
    module, function = entry_points["console_scripts"]["vllm"].split(":")
    source = ast.parse((site / Path(*module.split("."))).with_suffix(".py").read_text("utf-8"))
    # `python -m` runs it only if it calls its function under `if __name__ == "__main__"`.
    guards = [n for n in source.body if isinstance(n, ast.If) and "__main__" in ast.unparse(n.test)]
    assert any(f"{function}()" in ast.unparse(n) for n in guards), f"{module} does not run {function}() as __main__"
    return module


def serve_subcommand(site: Path) -> str:
    """`vllm serve`'s subcommand name: ServeSubcommand.name in vllm/entrypoints/cli/serve.py."""
    source = ast.parse((site / "vllm" / "entrypoints" / "cli" / "serve.py").read_text("utf-8"))
    cls = next(n for n in source.body if isinstance(n, ast.ClassDef) and n.name == "ServeSubcommand")
    names = [n.value for n in cls.body if isinstance(n, ast.Assign) and ast.unparse(n.targets[0]) == "name"]
    return ast.literal_eval(names[0])


DEVICES = [Device(cuda=True, capability=(7, 5)), Device(cuda=True, capability=(8, 0)), GPU]


def test_server_command_is_one_vllm_accepts(render_factory, tmp_path: Path, site: Path) -> None:
    commands = []
    for method in ("lora", "qlora"):
        ws = workspace(render_factory, tmp_path / method, rank=48, method=method)
        fake_vllm_python(ws)
        settings = load_settings(ws / "settings.toml")
        for device in DEVICES:
            commands += [vllm.command(settings, ws, device=device), vllm.command(settings, ws, True, device)]
    module = console_script(site)
    for cmd in commands:
        assert cmd[1:3] == ["-m", module], f"not vLLM's command-line entry ({module}): {cmd[:3]}"
    said = vllm_says(site, [cmd[3:] for cmd in commands], [])
    assert tuple(said["ranks"]) == vllm.LORA_RANKS
    for cmd, parsed in zip(commands, said["parsed"], strict=True):
        assert "error" not in parsed, f"vLLM's parser refuses {cmd[3:]}: {parsed['error']}"
        assert parsed["subparser"] == serve_subcommand(site) and parsed["model_tag"] == cmd[4]
        assert parsed["dtype"] in said["dtypes"]
        assert parsed["quantization"] in [None, *said["quantizations"]], f"vLLM has no {parsed['quantization']!r}"
        if "--enable-lora" in cmd:
            assert parsed["enable_lora"] and parsed["lora_modules"] == ["tiny-random-finetuned"]
            assert parsed["max_lora_rank"] == 64


def test_chat_request_is_one_vllm_reads_as_meant(site: Path) -> None:
    cases = [  # options, and the top-k the torch engine samples with
        ({"temperature": 0.7, "top_p": 0.9, "max_new_tokens": 20, "stop": ["END"]}, 50),  # its default
        ({"temperature": 0.7, "top_k": 0}, 0),  # no top-k asked for
        ({}, 0),  # greedy
    ]
    engine = OpenAIEngine({"chat": {"max_new_tokens": 64}}, "http://127.0.0.1:9/v1", "m", 256)
    bodies = [engine.request(Job([{"role": "user", "content": "hi"}], options)) for options, _ in cases]
    said = vllm_says(site, [], bodies)["requests"]
    for (options, top_k), body, request in zip(cases, bodies, said, strict=True):
        assert request["unknown"] == [] and request["deprecated"] == [], body
        assert request["max_completion_tokens"] == options.get("max_new_tokens", 64), body
        # vLLM samples with the torch engine's top-k, never the model's generation_config one (20).
        assert request["top_k"] == top_k, body
