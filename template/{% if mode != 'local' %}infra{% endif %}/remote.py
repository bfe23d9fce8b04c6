"""Fine-tune and serve this workspace on Azure: Container Apps serverless GPUs, or Azure ML for
several nodes.

    python infra/remote.py provision-finetuning  # storage, logs, GPU environment, the job
    python infra/remote.py set-secret            # HF_TOKEN for gated models (environment or prompt)
    python infra/remote.py run-finetuning        # upload the workspace, start a run, print its name
    python infra/remote.py logs                  # follow the latest run until it ends
    python infra/remote.py fetch                 # copy the adapter into the local adapter path
    python infra/remote.py provision-inference   # a Container App behind HTTPS and an API key
    python infra/remote.py deploy-inference      # sync the code, restart the app
    python infra/remote.py endpoint              # print the endpoint (--show-key: and the key)
    python infra/remote.py finetune --target azureml --nodes 2 --gpus-per-node 8
                                                 # an Azure ML job on 2 nodes of 8 GPUs each

Needs the Azure CLI, logged in (`az login`). Reads settings.toml ([azure]: subscription, group,
region, Azure ML names) and infra/provision/*.parameters.json. The work is in tuner/cloud/containerapps.py
(Container Apps) and tuner/cloud/azureml.py; this script reads the command line and calls them.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from tuner.cloud import azureml
from tuner.cloud import containerapps as remote
from tuner.settings import Interrupted, add_settings_arguments, run_script

COMMANDS = {
    "provision-finetuning": "create the storage, GPU environment and fine-tuning job",
    "set-secret": "store HF_TOKEN (environment or hidden prompt) as the job's secret",
    "upload": "copy the workspace to the file share (no models, caches, venvs, .git, secrets)",
    "run-finetuning": "upload the workspace and start a run; prints the run's name",
    "finetune": "start fine-tuning on a target: containerapps (run-finetuning) or azureml (multi-node)",
    "status": "show the latest runs and their state",
    "logs": "follow a run's log until it ends, reconnecting when the stream drops",
    "fetch": "copy the adapter from the share into the local adapter path",
    "provision-inference": "create the inference app (HTTPS, API key)",
    "deploy-inference": "sync the code to the share and restart the app",
    "endpoint": "print the inference endpoint",
}


def at_least_one(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be 1 or more, not {value}")
    return value


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python infra/remote.py",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        allow_abbrev=False,
    )
    add_settings_arguments(parser, None, "azure.location=westus3")  # --settings default: settings.toml
    # Also after the command (`remote.py fetch --settings x.toml --set ...`): SUPPRESS keeps a
    # --settings given before it, and --set given after adds to those given before (main()).
    common = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
    common.add_argument("--settings", type=Path, default=argparse.SUPPRESS, help="as before the command")
    common.add_argument("--set", dest="later_overrides", action="append", default=[], metavar="SECTION.KEY=VALUE")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    parsers = {
        name: sub.add_parser(name, help=text, description=text, parents=[common], allow_abbrev=False)
        for name, text in COMMANDS.items()
    }
    for name in ("run-finetuning", "finetune"):
        parsers[name].add_argument("--no-upload", action="store_true", help="start without uploading")
    finetune = parsers["finetune"]
    finetune.add_argument("--target", choices=["containerapps", "azureml"], default="containerapps")
    finetune.add_argument("--nodes", type=at_least_one, default=1, help="azureml: machines (default 1)")
    finetune.add_argument("--gpus-per-node", type=at_least_one, default=1, help="azureml: processes per machine")
    for name in ("status", "logs"):
        parsers[name].add_argument("--execution", help="a run's name (default: the latest)")
    parsers["logs"].add_argument("--interval", type=float, default=10.0, help="seconds between reconnections")
    parsers["deploy-inference"].add_argument(
        "--with-adapter", action="store_true", help="also upload the local adapter (trained on this machine)"
    )
    parsers["endpoint"].add_argument("--show-key", action="store_true", help="also print the API key")
    args = parser.parse_args(argv)
    if args.command == "finetune" and args.target == "containerapps" and (args.nodes, args.gpus_per_node) != (1, 1):
        finetune.error("--nodes and --gpus-per-node need --target azureml (a Container Apps job is one replica)")
    if args.command == "finetune" and args.target == "azureml" and args.no_upload:
        finetune.error("--no-upload is for --target containerapps (an Azure ML job always takes the code along)")
    return args


def run(ctx: remote.Context, args: argparse.Namespace) -> int:
    match args.command:
        case "provision-finetuning":
            return remote.provision_finetuning(ctx)
        case "set-secret":
            return remote.set_secret(ctx)
        case "upload":
            return remote.upload_workspace(ctx)
        case "finetune" if args.target == "azureml":
            return azureml.submit(ctx, args.nodes, args.gpus_per_node)
        case "run-finetuning" | "finetune":
            return remote.run_finetuning(ctx, upload_first=not args.no_upload)
        case "status":
            return remote.status(ctx, args.execution)
        case "logs":
            return remote.logs(ctx, args.execution, args.interval)
        case "fetch":
            return remote.fetch(ctx)
        case "provision-inference":
            return remote.provision_inference(ctx)
        case "deploy-inference":
            return remote.deploy_inference(ctx, args.with_adapter)
        case "endpoint":
            return remote.endpoint(ctx, args.show_key)
    raise AssertionError(args.command)  # argparse accepts only the commands above


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    root = Path(__file__).resolve().parents[1]
    overrides = tuple(args.overrides + args.later_overrides)
    try:
        return run(remote.load_context(root, args.settings or root / "settings.toml", overrides), args)
    except KeyboardInterrupt:
        raise Interrupted("interrupted (a job run goes on: `python infra/remote.py status`)") from None


if __name__ == "__main__":
    run_script(main)
