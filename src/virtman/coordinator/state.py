"""Volt's durable state in embedded SQLite: images, agents, tree positions.

Every change is one transaction, so a Volt killed at any instant restarts on a
consistent state: the trees come back with the same positions, and agents that keep
heartbeating keep their parents.

SQLite's errors are translated here, at the boundary: a database that cannot be opened
is a ``ConfigError``, one that fails later (disk full, I/O error) a ``DeviceError``.
"""

from __future__ import annotations

import contextlib
import json
import sqlite3
from collections.abc import Iterator
from dataclasses import dataclass

from virtman.blockdev.manifest import Manifest
from virtman.errors import ConfigError, DeviceError

SCHEMA = """
CREATE TABLE IF NOT EXISTS images (
    name TEXT PRIMARY KEY,
    origins TEXT NOT NULL,
    size INTEGER NOT NULL,
    chunk_size INTEGER NOT NULL,
    manifest TEXT NOT NULL,
    fingerprint TEXT NOT NULL,
    created REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS agents (
    name TEXT PRIMARY KEY,
    url TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS members (
    image TEXT NOT NULL REFERENCES images(name) ON DELETE CASCADE,
    agent TEXT NOT NULL,
    relay_uri TEXT NOT NULL,
    position INTEGER NOT NULL,
    PRIMARY KEY (image, agent),
    UNIQUE (image, position)
);
CREATE TABLE IF NOT EXISTS bakes (
    name TEXT PRIMARY KEY,
    doc TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS profiles (
    image TEXT PRIMARY KEY REFERENCES images(name) ON DELETE CASCADE,
    doc TEXT NOT NULL
);
"""


@dataclass(frozen=True)
class ImageRecord:
    name: str
    origins: list[str]
    size: int
    chunk_size: int
    manifest_json: str
    fingerprint: str
    created: float

    def manifest(self) -> Manifest:
        return Manifest.from_json(self.manifest_json, source=f"image {self.name}")


@dataclass(frozen=True)
class Member:
    image: str
    agent: str
    relay_uri: str
    position: int


class VoltState:
    def __init__(self, path: str) -> None:
        self.path = path
        try:
            # Default isolation: each `with self._db:` block is one transaction.
            self._db = sqlite3.connect(path, check_same_thread=False)
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=FULL")
            self._db.execute("PRAGMA foreign_keys=ON")
            self._db.executescript(SCHEMA)
        except sqlite3.Error as err:
            raise ConfigError(f"volt database {path}: cannot open it: {err}") from err

    def close(self) -> None:
        self._db.close()

    @contextlib.contextmanager
    def _failing(self, action: str) -> Iterator[None]:
        try:
            yield
        except sqlite3.Error as err:
            raise DeviceError(f"volt database {self.path}: cannot {action}: {err}") from err

    # --- images -----------------------------------------------------------------------------

    def add_image(self, record: ImageRecord) -> None:
        with self._failing(f"add image {record.name!r}"), self._db:
            self._db.execute(
                "INSERT INTO images VALUES (?, ?, ?, ?, ?, ?, ?)",
                (
                    record.name,
                    json.dumps(record.origins),
                    record.size,
                    record.chunk_size,
                    record.manifest_json,
                    record.fingerprint,
                    record.created,
                ),
            )

    def remove_image(self, name: str) -> None:
        with self._failing(f"remove image {name!r}"), self._db:
            self._db.execute("DELETE FROM members WHERE image = ?", (name,))
            self._db.execute("DELETE FROM profiles WHERE image = ?", (name,))
            self._db.execute("DELETE FROM images WHERE name = ?", (name,))

    def images(self) -> list[ImageRecord]:
        with self._failing("read the images"):
            rows = self._db.execute(
                "SELECT name, origins, size, chunk_size, manifest, fingerprint, created "
                "FROM images ORDER BY name"
            ).fetchall()
        return [ImageRecord(r[0], json.loads(r[1]), r[2], r[3], r[4], r[5], r[6]) for r in rows]

    # --- boot profiles ------------------------------------------------------------------------

    def set_profile(self, image: str, doc_json: str | None) -> None:
        """Keep ``image``'s boot profile (its JSON document); None removes it."""
        with self._failing(f"keep the boot profile of image {image!r}"), self._db:
            if doc_json is None:
                self._db.execute("DELETE FROM profiles WHERE image = ?", (image,))
            else:
                self._db.execute(
                    "INSERT INTO profiles VALUES (?, ?) "
                    "ON CONFLICT(image) DO UPDATE SET doc = excluded.doc",
                    (image, doc_json),
                )

    def profiles(self) -> dict[str, str]:
        """Every image's boot profile document (JSON), by image."""
        with self._failing("read the boot profiles"):
            rows = self._db.execute("SELECT image, doc FROM profiles").fetchall()
        return {r[0]: r[1] for r in rows}

    # --- bakes --------------------------------------------------------------------------------

    def add_bake(self, name: str, doc_json: str) -> None:
        """Keep a bake's record (its JSON document): its images are added before it."""
        with self._failing(f"add bake {name!r}"), self._db:
            self._db.execute("INSERT INTO bakes VALUES (?, ?)", (name, doc_json))

    def remove_bake(self, name: str) -> None:
        with self._failing(f"remove bake {name!r}"), self._db:
            self._db.execute("DELETE FROM bakes WHERE name = ?", (name,))

    def bakes(self) -> dict[str, str]:
        """Every bake's record (JSON), by name."""
        with self._failing("read the bakes"):
            rows = self._db.execute("SELECT name, doc FROM bakes ORDER BY name").fetchall()
        return {r[0]: r[1] for r in rows}

    # --- agents -------------------------------------------------------------------------------

    def upsert_agent(self, name: str, url: str) -> None:
        with self._failing(f"record agent {name!r}"), self._db:
            self._db.execute(
                "INSERT INTO agents VALUES (?, ?) "
                "ON CONFLICT(name) DO UPDATE SET url = excluded.url",
                (name, url),
            )

    def agents(self) -> dict[str, str]:
        with self._failing("read the agents"):
            return dict(self._db.execute("SELECT name, url FROM agents").fetchall())

    # --- tree membership -----------------------------------------------------------------------

    def members(self, image: str | None = None) -> list[Member]:
        query = "SELECT image, agent, relay_uri, position FROM members"
        args: tuple[str, ...] = ()
        if image is not None:
            query += " WHERE image = ?"
            args = (image,)
        with self._failing("read the trees"):
            rows = self._db.execute(query + " ORDER BY image, position", args).fetchall()
        return [Member(*row) for row in rows]

    def save_tree(self, image: str, positions: dict[str, int], relays: dict[str, str]) -> None:
        """Replace an image's membership by these positions, in one transaction."""
        with self._failing(f"save the tree of {image!r}"), self._db:
            self._db.execute("DELETE FROM members WHERE image = ?", (image,))
            self._db.executemany(
                "INSERT INTO members VALUES (?, ?, ?, ?)",
                [(image, agent, relays[agent], pos) for agent, pos in positions.items()],
            )
