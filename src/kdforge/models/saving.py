"""Write a Hugging Face model folder atomically (staged beside its destination, then renamed)."""

from __future__ import annotations

from pathlib import Path

from kdforge.io import staged_folder


def write_pretrained(folder: str | Path, model, tokenizer=None, extra_files: dict[str, str] | None = None) -> Path:
    """``save_pretrained`` of ``model`` (and ``tokenizer``) plus small text files, written atomically."""
    folder = Path(folder)
    with staged_folder(folder) as staging:
        model.save_pretrained(staging)
        if tokenizer is not None:
            tokenizer.save_pretrained(staging)
        for name, text in (extra_files or {}).items():
            (staging / name).write_text(text)
    return folder
