"""`--model`: check that a folder is a transformers model, and load it as a sequence classifier.

Apart from the run so that the command line can name `ModelError` without importing transformers or torch.
"""

from __future__ import annotations

from pathlib import Path


class ModelError(ValueError):
    """`--model` does not name a usable transformers folder (one-line message)."""


def check_model_dir(model_dir: Path) -> None:
    """Fail fast, before any data is tokenised, when `model_dir` is not a transformers model folder."""
    if not model_dir.is_dir():
        raise ModelError(f"--model {model_dir}: no such folder")
    if not (model_dir / "config.json").is_file():
        raise ModelError(f"--model {model_dir}: not a transformers model folder (no config.json)")
    from transformers import AutoConfig

    try:
        AutoConfig.from_pretrained(model_dir)
    except Exception as error:  # transformers raises many types here; the user needs only the reason
        raise ModelError(f"--model {model_dir}: not a transformers model folder ({_first_line(error)})") from None


def _first_line(error: Exception) -> str:
    text = str(error).strip().splitlines()
    return f"{type(error).__name__}: {text[0] if text else ''}"


def load_model(model_dir: Path, num_labels: int):
    """(model, tokenizer); a tokenizer without a pad token pads with its end-of-sequence token."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(model_dir)
        model = AutoModelForSequenceClassification.from_pretrained(
            model_dir, num_labels=num_labels, ignore_mismatched_sizes=True
        )
    except Exception as error:  # as above: missing weights, unknown architecture, no tokenizer files
        raise ModelError(f"--model {model_dir}: cannot load a sequence classifier ({_first_line(error)})") from None
    if tokenizer.pad_token is None and tokenizer.eos_token is not None:
        tokenizer.pad_token = tokenizer.eos_token
    if model.config.pad_token_id is None:
        model.config.pad_token_id = tokenizer.pad_token_id
    return model, tokenizer
