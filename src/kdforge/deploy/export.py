"""Export models in formats the ecosystem loads.

* Hugging Face models: ``save_pretrained`` + the tokenizer, so plain
  ``AutoModelForSequenceClassification.from_pretrained(folder)`` reproduces kdforge's predictions.
* Built-in vision nets: ``model.safetensors`` + ``kdforge_model.json`` naming the architecture;
  ``kdforge.models.loading.load_model(folder)`` rebuilds them (:func:`kdforge.models.loading.load_vision_export`).
The folder is written beside its destination and renamed into place (atomic).
"""

from __future__ import annotations

import json
from pathlib import Path

from safetensors.torch import save_model

from kdforge.io import staged_folder
from kdforge.models.loading import VISION_META, LoadedModel
from kdforge.models.saving import write_pretrained
from kdforge.models.sps import is_sps, save_sps_compact, save_sps_unrolled


def export_model(loaded: LoadedModel, folder: str | Path) -> Path:
    """Export to ``folder``; a Pea-KD SPS student is written unrolled there (a standard model) and in
    its compact shared form beside it (``<folder>-compact``, reload with ``load_model``)."""
    folder = Path(folder)
    if loaded.is_hf:
        if is_sps(loaded.model):
            save_sps_compact(loaded.model, folder.with_name(f"{folder.name}-compact"), loaded.tokenizer)
            return save_sps_unrolled(loaded.model, folder, loaded.tokenizer)
        return write_pretrained(folder, loaded.model, loaded.tokenizer)
    arch = loaded.source.removeprefix("vision:")
    num_classes = loaded.model.fc.out_features if hasattr(loaded.model, "fc") else None
    with staged_folder(folder) as staging:
        save_model(loaded.model, str(staging / "model.safetensors"))
        (staging / VISION_META).write_text(json.dumps({"arch": arch, "num_classes": num_classes}, indent=2))
    return folder
