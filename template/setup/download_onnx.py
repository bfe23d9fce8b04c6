"""Download the base model's published int4 ONNX build for this workspace's platform.

    python setup/download_onnx.py            # only the variant for [model] platform
    python setup/download_onnx.py --dry-run  # say what would be downloaded

Publishers put one build per platform in a subfolder of one Hub repo (for example
cpu_and_mobile/cpu-int4-rtn-block-32-acc-level-4); only that subfolder is downloaded, into
model-cache/onnx/<repo>/<variant>/. Chat with it (base model, no fine-tuning):
python inference/console_chat.py --backend onnx --baseonly. For the fine-tuned model, export
your own: python inference/export_onnx.py
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tuner.hub import HubError, fetch
from tuner.settings import settings_for_script

ROOT = Path(__file__).resolve().parents[1]


class NoOnnxBuild(Exception):
    """The model has no published ONNX build for the platform, said in one line."""


@dataclass(frozen=True)
class Plan:
    repo: str
    variant: str
    revision: str | None
    allow_patterns: list[str]
    dest: Path  # the repo's local folder; the model lands in dest / variant

    @property
    def model_dir(self) -> Path:
        return self.dest / self.variant


def plan_download(onnx: dict[str, Any] | None, platform: str, model_id: str = "the model", root: Path = ROOT) -> Plan:
    """What to download for `platform`, without touching the network.

    `onnx` is either the catalog's entry ({repo, variants: {platform: subfolder}}) or the
    workspace's [onnx] settings ({repo, variant[, revision, path]}), the variant already chosen.
    """
    onnx = onnx or {}
    repo = onnx.get("repo") or ""
    if "variants" in onnx:
        variant = (onnx.get("variants") or {}).get(platform) or ""
    else:
        variant = onnx.get("variant") or ""
    if not repo:
        raise NoOnnxBuild(f"{model_id} has no published ONNX build; export your own: python inference/export_onnx.py")
    if not variant:
        raise NoOnnxBuild(
            f"{repo} has no ONNX build for platform {platform}; export your own: python inference/export_onnx.py"
        )
    variant = variant.strip("/")
    dest = root / (onnx.get("path") or f"model-cache/onnx/{repo}")
    return Plan(repo, variant, onnx.get("revision") or None, [f"{variant}/*"], dest)


def download(plan: Plan) -> None:
    """Fetch the variant's files (resuming partial downloads); HubError says what failed."""
    fetch(plan.repo, plan.revision, plan.dest, plan.allow_patterns)
    if not (plan.model_dir / "genai_config.json").is_file():
        raise HubError(f"{plan.repo} has no ONNX model in {plan.variant}/ (no genai_config.json): check [onnx] variant")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--settings", type=Path, default=ROOT / "settings.toml")
    parser.add_argument("--dry-run", action="store_true", help="print what would be downloaded and stop")
    args = parser.parse_args()
    settings = settings_for_script(args.settings)
    model = settings["model"]
    try:
        plan = plan_download(settings.get("onnx", {}), model["platform"], model["id"])
    except NoOnnxBuild as err:
        sys.exit(f"error: {err}")
    where = plan.model_dir.relative_to(ROOT) if plan.model_dir.is_relative_to(ROOT) else plan.model_dir
    if args.dry_run:
        print(f"would download {plan.repo} files {plan.allow_patterns[0]} to {where}")
        return
    print(f"Downloading {plan.repo}/{plan.variant} to {where}", flush=True)
    try:
        download(plan)
    except HubError as err:
        sys.exit(f"error: {err}")
    print(f"Done: {where}")


if __name__ == "__main__":
    main()
