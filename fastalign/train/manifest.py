"""Manifests of saved directories (checkpoints, ``final/``): every file with its size and SHA-256, written before the
``COMPLETE`` marker, so a resume can tell a whole checkpoint from a torn, truncated or bit-flipped one and name
the file that is wrong.

    MANIFEST.json   {"format": 1, "files": {"model/model.safetensors": {"size": 1234, "sha256": "..."}, ...}}
    COMPLETE        written last (its text: the step, or "final")

Files are fsynced as they are hashed, so a checkpoint that carries COMPLETE is on disk, not only in the page cache.
"""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

MANIFEST = "MANIFEST.json"
COMPLETE = "COMPLETE"
FORMAT = 1
CHUNK_BYTES = 1 << 22  # read 4 MiB at a time while hashing


def file_digest(path: Path, *, sync: bool = False) -> tuple[int, str]:
    """(size in bytes, SHA-256 hex digest) of a file; ``sync`` also flushes it to disk first."""
    digest, size = hashlib.sha256(), 0
    with open(path, "rb") as fh:
        if sync:
            os.fsync(fh.fileno())
        while chunk := fh.read(CHUNK_BYTES):
            digest.update(chunk)
            size += len(chunk)
    return size, digest.hexdigest()


def _files(directory: Path) -> list[Path]:
    return sorted(p for p in directory.rglob("*") if p.is_file() and p.name not in (MANIFEST, COMPLETE))


def write_manifest(directory: str | Path) -> dict:
    """Hash (and fsync) every file under ``directory`` into its MANIFEST.json; returns the manifest."""
    directory = Path(directory)
    files = {}
    for path in _files(directory):
        size, sha = file_digest(path, sync=True)
        files[path.relative_to(directory).as_posix()] = {"size": size, "sha256": sha}
    manifest = {"format": FORMAT, "files": files}
    _write_synced(directory / MANIFEST, json.dumps(manifest, indent=1))
    return manifest


def mark_complete(directory: str | Path, text: str) -> None:
    """Write COMPLETE (after the manifest) and flush the directory entries."""
    directory = Path(directory)
    _write_synced(directory / COMPLETE, text)
    sync_dir(directory)


def verify(directory: str | Path) -> str | None:
    """None when ``directory`` matches its manifest; otherwise what is wrong, naming the file."""
    directory = Path(directory)
    if not (directory / COMPLETE).is_file():
        return f"no {COMPLETE} marker (the save did not finish)"
    try:
        manifest = json.loads((directory / MANIFEST).read_text(encoding="utf-8"))
        files = manifest["files"]
    except FileNotFoundError:
        return f"no {MANIFEST}"
    except (ValueError, KeyError, TypeError) as exc:
        return f"{MANIFEST} is unreadable ({type(exc).__name__}: {exc})"
    if not files:
        return f"{MANIFEST} lists no files"
    for name, entry in files.items():
        path = directory / name
        if not path.is_file():
            return f"{name} is missing"
        size = path.stat().st_size
        if size != entry["size"]:
            return f"{name} has {size} bytes, the manifest says {entry['size']} (truncated or rewritten)"
        if file_digest(path)[1] != entry["sha256"]:
            return f"{name}: SHA-256 differs from the manifest (the file is corrupted or was changed)"
    return None


def _write_synced(path: Path, text: str) -> None:
    tmp = path.with_name(f".tmp-{path.name}")
    with open(tmp, "w", encoding="utf-8") as fh:
        fh.write(text)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


def sync_dir(directory: Path) -> None:
    """fsync a directory, so renames and new entries in it survive a crash."""
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
