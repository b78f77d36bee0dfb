"""Run folders, fingerprints and atomic writes.

An artifact is a folder of data files plus a `meta.json`. Every file is written under a temporary name and renamed,
so a crash never leaves a half-written file that looks complete; a folder counts as complete only once its
`meta.json` exists (written last).
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import shutil
import threading
from contextlib import contextmanager
from importlib import metadata
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

META = "meta.json"
_VERSIONED = ("torch", "transformers", "sae-lens", "transformer-lens", "tokenizers", "safetensors", "hydra-core")


def fingerprint(obj: Any, length: int = 16) -> str:
    """A stable short hash of any JSON-able object (keys sorted)."""
    blob = json.dumps(obj, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:length]


def file_fingerprint(path: str | Path, content_limit: int = 64 << 20) -> str:
    """Content hash for small files; size + mtime for large ones (hashing a 60 GB checkpoint is not worth it)."""
    p = Path(path)
    st = p.stat()
    if st.st_size <= content_limit:
        return hashlib.sha256(p.read_bytes()).hexdigest()[:16]
    return f"{st.st_size}-{int(st.st_mtime)}"


def folder_fingerprint(path: str | Path) -> str:
    """Fingerprint of a model folder: every file's name and content (or size/mtime when huge)."""
    p = Path(path)
    return fingerprint({f.relative_to(p).as_posix(): file_fingerprint(f) for f in sorted(p.rglob("*")) if f.is_file()})


def library_versions() -> dict[str, str]:
    versions = {"python": platform.python_version()}
    for name in _VERSIONED:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            pass
    return versions


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # per process AND thread: two threads writing one file (the judge cache, for identical requests in flight
    # together) must not share a temporary file, or the second rename finds it gone (FileNotFoundError)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}-{threading.get_ident()}")
    with open(tmp, "wb") as fh:
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


def atomic_write_text(path: str | Path, text: str) -> None:
    atomic_write_bytes(path, text.encode())


def atomic_write_json(path: str | Path, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=False, default=str) + "\n")


def write_jsonl(path: str | Path, records: list[dict]) -> None:
    atomic_write_text(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))


def read_jsonl(path: str | Path) -> list[dict]:
    with open(path, encoding="utf-8") as fh:
        return [json.loads(line) for line in fh if line.strip()]


@contextmanager
def atomic_dir(path: str | Path) -> Iterator[Path]:
    """Build a folder under a temporary name; it appears at `path` only if the block finishes."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if path.exists():
        shutil.rmtree(path)
    os.replace(tmp, path)


def is_complete(folder: str | Path) -> bool:
    return (Path(folder) / META).exists()


def write_meta(folder: str | Path, **fields: Any) -> None:
    """Mark a folder complete: its config, input fingerprints, library versions. Always the last write."""
    atomic_write_json(Path(folder) / META, {**fields, "versions": library_versions()})


def read_meta(folder: str | Path) -> dict:
    return json.loads((Path(folder) / META).read_text())


def shard_path(folder: str | Path, batch_index: int) -> Path:
    return Path(folder) / f"shard-{batch_index:05d}.jsonl"


def _shard_stamp(stamp: dict, batch_size: int, n_items: int) -> dict:
    return {**stamp, "batch_size": batch_size, "n_items": n_items}


def shards_done(folder: str | Path, n_items: int, batch_size: int, stamp: dict) -> bool:
    """Whether `fill_shards` with these arguments has nothing left to make (every shard exists, under this stamp)."""
    folder = Path(folder)
    stamp_path = folder / "key.json"
    if not stamp_path.exists() or json.loads(stamp_path.read_text()) != _shard_stamp(stamp, batch_size, n_items):
        return False
    return all(shard_path(folder, b).exists() for b in range(-(-n_items // batch_size)))


def fill_shards(folder: str | Path, items: Sequence, batch_size: int, make_lines: Callable[[Sequence, int], list[str]],
                *, stamp: dict, desc: str, progress: bool = True) -> list[Path]:
    """Resumable batch job: batch b of `items` becomes `shard-b.jsonl` (`make_lines(batch, b)`, written atomically:
    a shard is all or nothing); a rerun makes only the missing shards, so an interrupted job loses and repeats nothing.
    `stamp` (with the batch size and item count added) is kept in `key.json`: shards made under another stamp, or
    cut with another batch size (shard b holds batch b, so they would lose or repeat items), are deleted and redone.
    Returns every shard path, in order."""
    from tqdm.auto import tqdm

    folder = Path(folder)
    stamp_path = folder / "key.json"
    want = _shard_stamp(stamp, batch_size, len(items))
    if folder.exists() and (not stamp_path.exists() or json.loads(stamp_path.read_text()) != want):
        if any(folder.glob("shard-*.jsonl")):
            print(f"{desc}: {folder} holds shards of another configuration or batch size; regenerating them")
        shutil.rmtree(folder)
    folder.mkdir(parents=True, exist_ok=True)
    atomic_write_json(stamp_path, want)
    batches = [items[i: i + batch_size] for i in range(0, len(items), batch_size)]
    todo = [b for b in range(len(batches)) if not shard_path(folder, b).exists()]
    bar = tqdm(total=len(items), initial=len(items) - sum(len(batches[b]) for b in todo), desc=desc, unit="q",
               disable=not progress)
    for b in todo:
        atomic_write_text(shard_path(folder, b), "".join(make_lines(batches[b], b)))
        bar.update(len(batches[b]))
    bar.close()
    return [shard_path(folder, b) for b in range(len(batches))]
