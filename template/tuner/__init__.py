"""The workspace's code, imported by the thin scripts in setup/, finetuning/, inference/ and infra/.

Four layers, each importing only the ones above it:

    settings     settings.toml -> checked, typed sections; --settings/--set; the one-line error path
    data         the dataset and the one prompt format: rows -> messages -> tokens and labels
    files        replace_folder: a folder swapped in whole, that a kill at any moment never loses
    hub          model downloads from the Hugging Face Hub, the offline copy

    training/    precision (dtype, 4-bit, device map), olive (Olive's config), runs (lock,
                 fingerprint, checkpoints, publishing, the trainer arguments), progress (the
                 progress bar, Olive's log to a file), evaluation (base / prompted / tuned),
                 benchmarks (lm-evaluation-harness before and after)
    serving/     load_engine, engine (the chat engine base), hf (transformers + peft), ort
                 (onnxruntime-genai), llamacpp (llama.cpp, on a GGUF export), upstream (an
                 OpenAI-compatible server), vllm, api (the routes and the page)
    export/      the exports of the fine-tuned model for inference/export.py: merged (the adapter
                 merged into the weights it trained on, in float32), onnx (the ONNX Runtime GenAI
                 builds), gguf and ollama (llama.cpp), check (each export answers the held-out
                 rows before it is kept), card and publish (the model card, the push to the Hub)
    cloud/       az (the Azure CLI), containerapps, azureml: the standard library only

Nothing here reads a file or touches the environment when imported: every function takes the
settings (and the workspace root, for relative paths) it needs.
"""
