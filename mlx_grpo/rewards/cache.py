"""A disk cache of teacher scores (sqlite), so no completion is ever paid for twice.

The key hashes everything the score depends on: teacher model and endpoint, scoring mode, the
rubric version (a hash of the rubric file, so editing a criterion invalidates old scores), the
prompt, the reference answer and the completion. Entries are committed as they arrive, so a
crashed or resumed run keeps every score it already paid for.
"""

from __future__ import annotations

import hashlib
import json
import sqlite3
import threading
from pathlib import Path

from mlx_grpo.errors import UserInputError


def score_key(*parts: str | None) -> str:
    return hashlib.sha256(json.dumps(parts, ensure_ascii=False).encode("utf-8")).hexdigest()


class ScoreCache:
    """key -> {criterion: [score in [0, 1], justification]}; safe to share between threads.

    The file is opened on first use, so a cache inside a run directory that does not exist yet
    (the trainer creates it after the model loads) can be handed out early.
    """

    def __init__(self, path: str | Path):
        self.path = Path(path).expanduser()
        self._lock = threading.Lock()
        self._db: sqlite3.Connection | None = None

    def _connection(self) -> sqlite3.Connection:
        if self._db is None:
            try:
                self.path.parent.mkdir(parents=True, exist_ok=True)
                db = sqlite3.connect(str(self.path), check_same_thread=False, isolation_level=None)
                db.execute("PRAGMA journal_mode=WAL")
                db.execute("CREATE TABLE IF NOT EXISTS scores (key TEXT PRIMARY KEY, value TEXT NOT NULL)")
            except (OSError, sqlite3.Error) as err:
                raise UserInputError(f"{self.path}: cannot use it as the teacher score cache ({err})") from None
            self._db = db
        return self._db

    def get(self, key: str) -> dict | None:
        with self._lock:
            row = self._connection().execute("SELECT value FROM scores WHERE key = ?", (key,)).fetchone()
        return None if row is None else json.loads(row[0])

    def put(self, key: str, value: dict) -> None:
        with self._lock:
            self._connection().execute("INSERT OR REPLACE INTO scores (key, value) VALUES (?, ?)",
                                       (key, json.dumps(value, ensure_ascii=False)))

    def __len__(self) -> int:
        with self._lock:
            return self._connection().execute("SELECT COUNT(*) FROM scores").fetchone()[0]

    def close(self) -> None:
        with self._lock:
            if self._db is not None:
                self._db.close()
                self._db = None
