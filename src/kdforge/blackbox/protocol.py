"""The JSON protocol between kdforge and a black-box teacher (a model seen only through its answers).

Request: ``POST <url>`` with ``Content-Type: application/json`` and the body::

    {"inputs": [INPUT, ...]}

where each ``INPUT`` is one of

* text: ``{"text": "first sentence", "text_pair": "second sentence"}`` (``text_pair`` only for
  sentence-pair tasks);
* an image: ``{"image": {"shape": [C, H, W], "dtype": "uint8", "data": "<base64>"}}``, ``data`` being
  the base64 of the raw ``C*H*W`` bytes in C order (channels first), pixel values 0..255 *before*
  any normalisation (the teacher normalises as it was trained to).

Response (HTTP 200, ``application/json``)::

    {"probabilities": [[p_0, ..., p_{K-1}], ...]}

one row per input, in the order of the request; each row is the teacher's softmax over the task's
``K`` classes (non-negative, summing to 1; logits are refused). A server answers a malformed request
with HTTP 400 and ``{"error": "<one line>"}``; any other failure is a 5xx.

Answers are cached under :func:`input_key`: the SHA-256 (hex) of the teacher's identity (its URL and
version, see :mod:`kdforge.blackbox.clients`), a NUL byte, and the canonical JSON of the input
(``sort_keys=True``, ``separators=(",", ":")``, UTF-8), so the same input sent to another teacher or
another version of it is a new query.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
from typing import Any

import numpy as np

from kdforge.errors import KDForgeError

#: a row of probabilities must sum to 1 within this tolerance
SUM_TOLERANCE = 1e-3


def encode_text(text_a: str, text_b: str | None = None) -> dict:
    """The protocol input for a sentence (``text_b`` None) or a sentence pair."""
    if not isinstance(text_a, str) or (text_b is not None and not isinstance(text_b, str)):
        raise KDForgeError(f"black-box text inputs must be strings, got {type(text_a).__name__} and "
                           f"{type(text_b).__name__}; pass the example's text_a/text_b")
    return {"text": text_a} if text_b is None else {"text": text_a, "text_pair": text_b}


def encode_image(array: np.ndarray) -> dict:
    """The protocol input for a ``uint8`` image of shape ``(C, H, W)`` (raw pixels 0..255)."""
    array = np.asarray(array)
    if array.dtype != np.uint8 or array.ndim != 3:
        raise KDForgeError(f"a black-box image input must be a uint8 array (C, H, W), got {array.dtype} "
                           f"{tuple(array.shape)}; send the raw pixels before normalisation, channels first")
    data = base64.b64encode(np.ascontiguousarray(array).tobytes()).decode("ascii")
    return {"image": {"shape": [int(n) for n in array.shape], "dtype": "uint8", "data": data}}


def decode_image(item: dict) -> np.ndarray:
    """The ``uint8 (C, H, W)`` array of an image input (``{"image": {...}}`` or its inner dict)."""
    image = item.get("image", item) if isinstance(item, dict) else item
    fix = 'send {"image": {"shape": [C, H, W], "dtype": "uint8", "data": BASE64}}'
    if not isinstance(image, dict):
        raise KDForgeError(f"an image input must be a JSON object, got {type(image).__name__}; {fix}")
    shape, dtype, data = image.get("shape"), image.get("dtype"), image.get("data")
    if dtype != "uint8":
        raise KDForgeError(f"image dtype {dtype!r} is not supported; {fix}")
    if not (isinstance(shape, list) and len(shape) == 3
            and all(isinstance(n, int) and not isinstance(n, bool) and n > 0 for n in shape)):
        raise KDForgeError(f"image shape {shape!r} is not three positive integers [C, H, W]; {fix}")
    if not isinstance(data, str):
        raise KDForgeError(f"image data is {type(data).__name__}, not a base64 string; {fix}")
    try:
        raw = base64.b64decode(data, validate=True)
    except (binascii.Error, ValueError) as err:
        raise KDForgeError(f"image data is not valid base64 ({err}); {fix}") from None
    expected = shape[0] * shape[1] * shape[2]
    if len(raw) != expected:
        raise KDForgeError(f"image data holds {len(raw)} bytes but shape {shape} needs {expected}; {fix}")
    return np.frombuffer(raw, dtype=np.uint8).reshape(shape).copy()


def check_input(item: Any) -> None:
    """Raise a one-line :class:`KDForgeError` unless ``item`` is a valid text or image input."""
    if not isinstance(item, dict):
        raise KDForgeError(f"an input must be a JSON object, got {type(item).__name__}; send "
                           '{"text": ...} or {"image": {...}}')
    if "image" in item:
        extra = set(item) - {"image"}
        if extra:
            raise KDForgeError(f"an image input has unexpected keys {sorted(extra)}; send only \"image\"")
        decode_image(item)
        return
    if not isinstance(item.get("text"), str):
        raise KDForgeError(f"an input needs a \"text\" string or an \"image\" (keys: {sorted(item)}); "
                           'send {"text": "...", "text_pair": "..."}')
    if not isinstance(item.get("text_pair", ""), str):
        raise KDForgeError("\"text_pair\" must be a string; leave it out for single sentences")
    extra = set(item) - {"text", "text_pair"}
    if extra:
        raise KDForgeError(f"a text input has unexpected keys {sorted(extra)}; send \"text\" and \"text_pair\"")


def canonical_json(item: Any) -> str:
    """The canonical JSON text of an input: sorted keys, no spaces, non-ASCII kept as is."""
    return json.dumps(item, sort_keys=True, separators=(",", ":"), ensure_ascii=False)


def input_key(identity: str, item: dict) -> str:
    """``sha256(identity + "\\0" + canonical JSON of item)`` in hex: the cache key of one answer."""
    digest = hashlib.sha256(identity.encode("utf-8"))
    digest.update(b"\0")
    digest.update(canonical_json(item).encode("utf-8"))
    return digest.hexdigest()


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float | np.integer | np.floating) and not isinstance(value, bool | np.bool_)


def check_probabilities(rows: Any, n_inputs: int, num_classes: int, source: str) -> np.ndarray:
    """``rows`` as a ``float32 (n_inputs, num_classes)`` array, after checking that it is one row of
    ``num_classes`` finite, non-negative numbers summing to 1 (within 1e-3) per input. ``source``
    (a URL or a teacher name) is named in the one-line errors."""
    fix = f"make the teacher {source} return one row of {num_classes} class probabilities per input"
    if hasattr(rows, "tolist") and not isinstance(rows, list | tuple):  # a numpy array or a torch tensor
        rows = rows.tolist()
    if not isinstance(rows, list | tuple) or not all(isinstance(row, list | tuple) for row in rows):
        raise KDForgeError(f"the answer of {source} is not a list of lists of probabilities "
                           f"(got {type(rows).__name__}); {fix}")
    if len(rows) != n_inputs:
        raise KDForgeError(f"{source} returned {len(rows)} rows of probabilities for {n_inputs} inputs; {fix}")
    for i, row in enumerate(rows):
        if len(row) != num_classes:
            raise KDForgeError(f"{source} returned {len(row)} probabilities in row {i} but the task has "
                               f"{num_classes} classes (expected {num_classes}, got {len(row)}); {fix}")
        if not all(_is_number(p) for p in row):
            raise KDForgeError(f"row {i} from {source} holds a value that is not a number; {fix}")
    array = np.asarray(rows, dtype=np.float64).reshape(n_inputs, num_classes)
    bad = ~np.isfinite(array) | (array < 0)
    if bad.any():
        i, j = map(int, np.argwhere(bad)[0])
        raise KDForgeError(f"{source} returned {array[i, j]} (negative or not finite) at row {i}, class {j}; "
                           f"the teacher must return probabilities (softmax), not logits")
    sums = array.sum(axis=1)
    off = np.abs(sums - 1) > SUM_TOLERANCE
    if off.any():
        i = int(np.argmax(off))
        raise KDForgeError(f"row {i} from {source} sums to {sums[i]:.6g}, not 1 (within {SUM_TOLERANCE}); "
                           "the teacher must return probabilities (softmax), not logits")
    return array.astype(np.float32)

