"""Download the base model's published int4 ONNX build for this workspace's platform.

    python setup/download_onnx.py            # only the variant for [model] platform
    python setup/download_onnx.py --dry-run  # say what would be downloaded

Publishers put one build per platform in a subfolder of one Hub repo (for example
cpu_and_mobile/cpu-int4-rtn-block-32-acc-level-4); only that subfolder is downloaded, into
model-cache/onnx/<repo>/<variant>/. Chat with it (base model, no fine-tuning):
python inference/console_chat.py --backend onnx --baseonly. For the fine-tuned model, export
your own: python inference/export.py --format onnx
"""

from __future__ import annotations

from pathlib import Path

from tuner.hub import download_onnx, plan_download
from tuner.settings import run_script, script_parser, settings_for_script

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    parser = script_parser(__doc__, ROOT, "onnx.variant=cpu_and_mobile/cpu-int4-rtn-block-32")
    parser.add_argument("--dry-run", action="store_true", help="print what would be downloaded and stop")
    args = parser.parse_args()
    settings = settings_for_script(args.settings, args.overrides)
    model = settings["model"]
    plan = plan_download(settings["onnx"], model["platform"], model["id"], ROOT)
    where = plan.model_dir.relative_to(ROOT) if plan.model_dir.is_relative_to(ROOT) else plan.model_dir
    if args.dry_run:
        print(f"would download {plan.repo} files {plan.allow_patterns[0]} to {where}")
        return
    print(f"Downloading {plan.repo}/{plan.variant} to {where}", flush=True)
    download_onnx(plan)
    print(f"Done: {where}")


if __name__ == "__main__":
    run_script(main)
