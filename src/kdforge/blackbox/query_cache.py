"""Paid answers kept: a SQLite cache of a black-box teacher's probabilities, and a query budget.

``folder/answers.sqlite`` (WAL journal) holds two tables:

* ``answers(key TEXT PRIMARY KEY, probs BLOB, created REAL)``: ``key`` is
  :func:`~kdforge.blackbox.protocol.input_key` (teacher identity + input), ``probs`` the row as
  little-endian float32 bytes, ``created`` a UNIX time;
* ``usage(identity TEXT PRIMARY KEY, queries INTEGER)``: the inputs ever sent to each teacher
  through this cache.

Every answered chunk is committed with its usage in one transaction, so a crash loses at most the
chunk in flight, and a resumed run neither pays twice for an input nor forgets what it spent:
``max_queries`` bounds ``usage.queries`` of the teacher, over all runs sharing the folder.
"""

from __future__ import annotations

import sqlite3
import threading
import time
from pathlib import Path

import numpy as np

from kdforge.blackbox.clients import BlackBoxClient
from kdforge.blackbox.protocol import input_key
from kdforge.errors import KDForgeError

DB_NAME = "answers.sqlite"
_LOOKUP_CHUNK = 500  # keys per SELECT ... IN (...), well under SQLite's parameter limit
_SCHEMA = """
CREATE TABLE IF NOT EXISTS answers (key TEXT PRIMARY KEY, probs BLOB NOT NULL, created REAL NOT NULL);
CREATE TABLE IF NOT EXISTS usage (identity TEXT PRIMARY KEY, queries INTEGER NOT NULL);
"""


class QueryCache:
    """The answers of the teacher ``identity`` stored in ``folder/answers.sqlite``."""

    def __init__(self, folder: str | Path, identity: str):
        self.folder = Path(folder)
        self.identity = identity
        self.path = self.folder / DB_NAME
        fix = "delete it or set black_box.cache_dir to a folder"
        if self.folder.exists() and not self.folder.is_dir():
            raise KDForgeError(f"the black-box cache folder {self.folder} is a file; {fix}")
        try:
            self.folder.mkdir(parents=True, exist_ok=True)
            self._db = sqlite3.connect(self.path, timeout=30, check_same_thread=False, isolation_level=None)
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=FULL")  # a commit survives a crash, even of the machine
            self._db.executescript(_SCHEMA)
        except (OSError, sqlite3.Error) as err:
            raise KDForgeError(f"cannot open the black-box cache {self.path} ({err}); {fix}") from None
        self._lock = threading.Lock()

    def key(self, item: dict) -> str:
        return input_key(self.identity, item)

    def get(self, keys: list[str]) -> dict[str, np.ndarray]:
        """The cached rows among ``keys``."""
        found: dict[str, np.ndarray] = {}
        unique = list(dict.fromkeys(keys))
        with self._lock:
            for start in range(0, len(unique), _LOOKUP_CHUNK):
                part = unique[start:start + _LOOKUP_CHUNK]
                rows = self._db.execute(f"SELECT key, probs FROM answers WHERE key IN ({','.join('?' * len(part))})",
                                        part).fetchall()
                found.update((key, np.frombuffer(blob, dtype="<f4").copy()) for key, blob in rows)
        return found

    def put(self, keys: list[str], probs: np.ndarray, queries: int | None = None) -> None:
        """Store the rows of ``probs`` under ``keys`` and add ``queries`` (default: the number of rows)
        to the teacher's usage, in one transaction."""
        probs = np.asarray(probs, dtype="<f4")
        now = time.time()
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                self._db.executemany("INSERT OR REPLACE INTO answers (key, probs, created) VALUES (?, ?, ?)",
                                     [(key, row.tobytes(), now) for key, row in zip(keys, probs, strict=True)])
                self._db.execute("INSERT INTO usage (identity, queries) VALUES (?, ?) ON CONFLICT(identity) "
                                 "DO UPDATE SET queries = queries + excluded.queries",
                                 (self.identity, len(keys) if queries is None else queries))
                self._db.execute("COMMIT")
            except BaseException:
                self._db.execute("ROLLBACK")
                raise

    def queries_total(self) -> int:
        """The inputs ever sent to this teacher through this cache (all runs)."""
        with self._lock:
            row = self._db.execute("SELECT queries FROM usage WHERE identity = ?", (self.identity,)).fetchone()
        return int(row[0]) if row else 0

    def __len__(self) -> int:
        with self._lock:
            return int(self._db.execute("SELECT COUNT(*) FROM answers").fetchone()[0])

    def close(self) -> None:
        self._db.close()

    def __enter__(self) -> QueryCache:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class BudgetedTeacher:
    """A black-box client behind a :class:`QueryCache` and a query budget.

    ``predict(items)`` answers cached inputs from the cache and sends only the others, each distinct
    input once, in chunks of ``chunk_size`` (default: the client's ``batch_size``, else 64), each chunk
    committed as soon as it is answered. When the new inputs would take the teacher's total past
    ``max_queries`` nothing of the call is sent and a one-line error says so."""

    def __init__(self, client: BlackBoxClient, cache: QueryCache, max_queries: int | None,
                 chunk_size: int | None = None):
        if cache.identity != client.identity:
            raise KDForgeError(f"the query cache is for teacher {cache.identity!r} but the client is "
                               f"{client.identity!r}; open the cache with the client's identity")
        if max_queries is not None and (isinstance(max_queries, bool) or max_queries < 0):
            raise KDForgeError(f"black_box.max_queries must be a non-negative integer or null, got {max_queries!r}")
        self.client = client
        self.cache = cache
        self.max_queries = max_queries
        self.chunk_size = int(chunk_size or getattr(client, "batch_size", 64) or 64)
        self.identity = client.identity
        self.num_classes = client.num_classes
        self.queries = 0  # new inputs sent by this process
        self.cache_hits = 0  # inputs answered from the cache by this process

    def predict(self, items: list[dict]) -> np.ndarray:
        keys = [self.cache.key(item) for item in items]
        answers = self.cache.get(keys)
        self._check_cached(answers)
        hits = sum(key in answers for key in keys)
        misses = {key: item for key, item in zip(keys, items, strict=True) if key not in answers}
        if misses and self.max_queries is not None:
            used = self.cache.queries_total()
            if used + len(misses) > self.max_queries:
                raise KDForgeError(
                    f"black-box teacher {self.identity}: max_queries {self.max_queries} would be exceeded: "
                    f"{len(misses)} new inputs needed, {used} used; raise black_box.max_queries or use fewer "
                    f"inputs (the {len(answers)} cached answers of this batch stay in {self.cache.path})")
        self.cache_hits += hits
        pending = list(misses.items())
        for start in range(0, len(pending), self.chunk_size):
            chunk = pending[start:start + self.chunk_size]
            chunk_keys = [key for key, _ in chunk]
            probs = self.client.predict([item for _, item in chunk])
            self.cache.put(chunk_keys, probs)
            self.queries += len(chunk)
            answers.update(zip(chunk_keys, np.asarray(probs, dtype=np.float32), strict=True))
        if not keys:
            return np.zeros((0, self.num_classes), dtype=np.float32)
        return np.stack([answers[key] for key in keys]).astype(np.float32)

    def _check_cached(self, answers: dict[str, np.ndarray]) -> None:
        row = next(iter(answers.values()), None)  # one row tells: an identity's rows come from one teacher
        if row is not None and row.shape != (self.num_classes,):
            raise KDForgeError(f"the black-box cache {self.cache.path} holds {row.shape[0]} probabilities per "
                               f"input but teacher {self.identity} has {self.num_classes} classes; delete the "
                               "cache or change black_box.version")

    def stats(self) -> dict:
        return {"queries_total": self.cache.queries_total(), "queries_this_run": self.queries,
                "cache_hits": self.cache_hits}
