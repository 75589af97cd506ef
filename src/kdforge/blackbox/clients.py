"""Black-box teacher clients: an HTTP server speaking :mod:`kdforge.blackbox.protocol`, a Python
callable, or a JSON-lines file of precomputed predictions.

Every client has an ``identity`` (which teacher, which version: the cache keys depend on it), its
``num_classes`` and ``predict(items) -> float32 (len(items), num_classes)`` probabilities, checked
by :func:`~kdforge.blackbox.protocol.check_probabilities`.

:class:`HttpTeacher` retries connection errors, timeouts, HTTP 429 and 5xx with exponential back-off
(``backoff_s * 2**attempt`` seconds, or the server's ``Retry-After`` when it is longer, at most 60 s);
other HTTP errors (4xx) fail at once. ``rate_limit_per_s`` spaces the starts of consecutive requests
at least ``1 / rate_limit_per_s`` seconds apart (retries included).
"""

from __future__ import annotations

import hashlib
import http.client
import json
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import numpy as np

from kdforge.blackbox.protocol import check_input, check_probabilities, input_key
from kdforge.errors import KDForgeError

_LOOPBACK = {"127.0.0.1", "localhost", "::1"}
_MAX_RETRY_AFTER_S = 60.0


@runtime_checkable
class BlackBoxClient(Protocol):
    """A teacher seen only through its class probabilities."""

    identity: str
    num_classes: int

    def predict(self, items: list[dict]) -> np.ndarray:
        """Checked probabilities, ``float32 (len(items), num_classes)``, one row per input in order."""
        ...


def _check_num_classes(num_classes: Any, where: str) -> int:
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1:
        raise KDForgeError(f"{where}: num_classes must be a positive integer, got {num_classes!r}; "
                           "give the task's number of labels")
    return num_classes


# ---------------------------------------------------------------------------- HTTP


class _Retryable(Exception):
    """A failure worth another attempt; ``reason`` is its one-line description."""

    def __init__(self, reason: str, wait_s: float = 0.0):
        super().__init__(reason)
        self.reason = reason
        self.wait_s = wait_s


class HttpTeacher:
    """A teacher behind an HTTP(S) endpoint speaking kdforge's black-box protocol."""

    def __init__(self, url: str, num_classes: int, version: str = "", timeout_s: float = 30,
                 retries: int = 3, backoff_s: float = 0.5, rate_limit_per_s: float | None = None,
                 batch_size: int = 64):
        parsed = urllib.parse.urlsplit(str(url))
        if parsed.scheme not in ("http", "https") or not parsed.hostname:
            raise KDForgeError(f"black-box teacher URL {url!r} is not an http:// or https:// URL; "
                               "set black_box.url to e.g. http://127.0.0.1:8000/predict")
        if not timeout_s > 0 or retries < 0 or backoff_s < 0 or batch_size < 1 or (
                rate_limit_per_s is not None and not rate_limit_per_s > 0):
            raise KDForgeError(f"black-box teacher {url}: timeout_s ({timeout_s}), rate_limit_per_s "
                               f"({rate_limit_per_s}) and batch_size ({batch_size}) must be positive, retries "
                               f"({retries}) and backoff_s ({backoff_s}) not negative; fix black_box settings")
        self.url = str(url)
        self.num_classes = _check_num_classes(num_classes, f"black-box teacher {url}")
        self.version = version
        self.timeout_s = float(timeout_s)
        self.retries = int(retries)
        self.backoff_s = float(backoff_s)
        self.min_interval_s = 1.0 / rate_limit_per_s if rate_limit_per_s else 0.0
        self.batch_size = int(batch_size)
        self.identity = f"{self.url}#{version}"
        self.requests_sent = 0  # HTTP requests attempted, retries included
        self._lock = threading.Lock()
        self._last_start: float | None = None
        # a proxy from the environment must not swallow requests to a server on this machine
        handlers = [urllib.request.ProxyHandler({})] if parsed.hostname in _LOOPBACK else []
        self._opener = urllib.request.build_opener(*handlers)

    def predict(self, items: list[dict]) -> np.ndarray:
        rows = [self._post(items[start:start + self.batch_size])
                for start in range(0, len(items), self.batch_size)]
        return np.concatenate(rows) if rows else np.zeros((0, self.num_classes), dtype=np.float32)

    def _wait_for_rate_limit(self) -> None:
        with self._lock:
            now = time.monotonic()
            if self._last_start is not None and self.min_interval_s:
                delay = self._last_start + self.min_interval_s - now
                if delay > 0:
                    time.sleep(delay)
                    now = time.monotonic()
            self._last_start = now
            self.requests_sent += 1

    def _post(self, items: list[dict]) -> np.ndarray:
        body = json.dumps({"inputs": items}, separators=(",", ":")).encode("utf-8")
        attempts = self.retries + 1
        for attempt in range(attempts):
            try:
                text = self._request(body)
                break
            except _Retryable as failure:
                if attempt + 1 == attempts:
                    raise KDForgeError(
                        f"black-box teacher {self.url} failed after {attempts} attempt(s): {failure.reason}; "
                        "check that the server is running and the URL is right, or raise black_box.timeout_s "
                        "(black_box.retries for flaky servers)") from None
                time.sleep(max(self.backoff_s * 2 ** attempt, failure.wait_s))
        return self._parse(text, len(items))

    def _request(self, body: bytes) -> bytes:
        """One POST; the response body, or :class:`_Retryable`, or a KDForgeError for a 4xx."""
        self._wait_for_rate_limit()
        request = urllib.request.Request(self.url, data=body, method="POST",
                                         headers={"Content-Type": "application/json",
                                                  "Accept": "application/json"})
        try:
            with self._opener.open(request, timeout=self.timeout_s) as response:
                return response.read()
        except urllib.error.HTTPError as err:
            detail = _error_detail(err)
            status = f"HTTP {err.code} ({err.reason}){detail}"
            if err.code == 429 or err.code >= 500:
                raise _Retryable(status, _retry_after(err)) from None
            raise KDForgeError(f"black-box teacher {self.url} refused the request: {status}; check the URL and "
                               "that the server speaks kdforge's black-box protocol") from None
        except TimeoutError:
            raise _Retryable(f"no answer within {self.timeout_s:g} s") from None
        except urllib.error.URLError as err:
            reason = err.reason
            if isinstance(reason, TimeoutError):
                raise _Retryable(f"no answer within {self.timeout_s:g} s") from None
            raise _Retryable(f"network error ({reason})") from None
        except (OSError, http.client.HTTPException) as err:
            raise _Retryable(f"network error ({type(err).__name__}: {err})") from None

    def _parse(self, text: bytes, n_inputs: int) -> np.ndarray:
        fix = 'make the server answer {"probabilities": [[p_0, ..., p_K-1], ...]}'
        try:
            answer = json.loads(text)
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            start = text[:60].decode("utf-8", "replace")
            raise KDForgeError(f"black-box teacher {self.url} answered with malformed JSON ({err}; starts "
                               f"with {start!r}); {fix}") from None
        if not isinstance(answer, dict) or "probabilities" not in answer:
            keys = sorted(answer) if isinstance(answer, dict) else type(answer).__name__
            raise KDForgeError(f"black-box teacher {self.url} answered without a \"probabilities\" key "
                               f"(got {keys}); {fix}")
        return check_probabilities(answer["probabilities"], n_inputs, self.num_classes, self.url)


def _error_detail(err: urllib.error.HTTPError) -> str:
    """``: <message>`` from a JSON ``{"error": ...}`` body of an HTTP error, else nothing."""
    try:
        payload = json.loads(err.read() or b"null")
    except (OSError, ValueError, http.client.HTTPException):
        return ""
    message = payload.get("error") if isinstance(payload, dict) else None
    return f": {' '.join(str(message).split())[:300]}" if message else ""


def _retry_after(err: urllib.error.HTTPError) -> float:
    try:
        return min(max(float(err.headers.get("Retry-After", 0)), 0.0), _MAX_RETRY_AFTER_S)
    except (TypeError, ValueError):
        return 0.0  # an HTTP date: the exponential back-off decides


# ---------------------------------------------------------------------------- callable


class CallableTeacher:
    """A Python function ``fn(items) -> probabilities`` (array-like, one row per item) as a teacher."""

    def __init__(self, fn: Callable[[list[dict]], Any], name: str, num_classes: int, version: str = ""):
        if not callable(fn):
            raise KDForgeError(f"black-box teacher {name!r}: {fn!r} is not callable; pass a function of a list "
                               "of inputs returning their probabilities")
        self.fn = fn
        self.name = name
        self.num_classes = _check_num_classes(num_classes, f"black-box teacher {name!r}")
        self.version = version
        self.identity = f"callable:{name}#{version}"

    def predict(self, items: list[dict]) -> np.ndarray:
        if not items:
            return np.zeros((0, self.num_classes), dtype=np.float32)
        return check_probabilities(self.fn(list(items)), len(items), self.num_classes, self.identity)


# ---------------------------------------------------------------------------- file


class FileTeacher:
    """Precomputed predictions: a JSON-lines file, one ``{"input": INPUT, "probabilities": [...]}``
    per line (blank lines skipped), looked up by :func:`~kdforge.blackbox.protocol.input_key`.
    The identity is ``file:`` + the SHA-256 of the file, so an edited file is a new teacher."""

    def __init__(self, path: str | Path, num_classes: int):
        self.path = Path(path)
        self.num_classes = _check_num_classes(num_classes, f"black-box teacher file {path}")
        try:
            data = self.path.read_bytes()
        except OSError as err:
            raise KDForgeError(f"cannot read the black-box predictions file {self.path} ({err.strerror or err}); "
                               "fix black_box.file") from None
        self.identity = "file:" + hashlib.sha256(data).hexdigest()
        self._answers: dict[str, np.ndarray] = {}
        for number, line in enumerate(data.decode("utf-8", "replace").splitlines(), start=1):
            if line.strip():
                self._add(number, line)

    def _add(self, number: int, line: str) -> None:
        where = f"line {number} of {self.path}"
        fix = 'write one {"input": {"text": ...}, "probabilities": [...]} per line'
        try:
            record = json.loads(line)
        except json.JSONDecodeError as err:
            raise KDForgeError(f"{where} is not valid JSON ({err.msg}); {fix}") from None
        if not isinstance(record, dict) or "input" not in record or "probabilities" not in record:
            raise KDForgeError(f"{where} lacks \"input\" or \"probabilities\"; {fix}")
        try:
            check_input(record["input"])
        except KDForgeError as err:
            raise KDForgeError(f"{where}: {err}") from None
        row = check_probabilities([record["probabilities"]], 1, self.num_classes, where)[0]
        key = input_key(self.identity, record["input"])
        if key in self._answers and not np.array_equal(self._answers[key], row):
            raise KDForgeError(f"{where} repeats an earlier input with other probabilities; keep one line per input")
        self._answers[key] = row

    def __len__(self) -> int:
        return len(self._answers)

    def predict(self, items: list[dict]) -> np.ndarray:
        rows = []
        for item in items:
            row = self._answers.get(input_key(self.identity, item))
            if row is None:
                shown = json.dumps(item, ensure_ascii=False)
                shown = shown if len(shown) <= 80 else shown[:77] + "..."
                raise KDForgeError(f"input {shown} not in {self.path}; add its prediction or use an HTTP/callable "
                                   "teacher")
            rows.append(row)
        return np.stack(rows) if rows else np.zeros((0, self.num_classes), dtype=np.float32)
