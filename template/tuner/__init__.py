"""The workspace's code, imported by the thin scripts in setup/, finetuning/, inference/ and infra/.

    settings       settings.toml -> a dict (one-line errors for broken or conflicted files)
    data           the dataset and the one prompt format: rows -> messages -> tokens and labels
    evaluation     held-out scores, base vs fine-tuned, written to eval.json beside the adapter
    runs           a run's bookkeeping: the lock, its fingerprint, torn checkpoints, publishing the adapter
    hub            model downloads from the Hugging Face Hub, and the offline copy of SmolLM2
    chat           the chat engine base: a worker thread, jobs, streaming, stop strings
    torch_engine   the engine on transformers + peft
    onnx_engine    the engine on onnxruntime-genai (inference/export_onnx.py's output)
    backends       load_engine(): the engine the settings ask for
    api            the OpenAI-compatible routes and the Gradio page (inference/gradio_chat.py)
    azure          the Azure CLI (az): run with JSON output, failures as one line, login and region checks
    remote         infra/remote.py's commands on Azure Container Apps: config files, upload, jobs, the app
    azureml        infra/remote.py finetune --target azureml: a multi-node Azure ML command job

Nothing here reads a file or touches the environment when imported: every function takes the
settings (and the workspace root, for relative paths) it needs.
"""
