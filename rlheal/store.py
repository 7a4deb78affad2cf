"""The artifact store: the cache that makes resume work.

Every stage output is a directory `<root>/<stage>/<key>/`, where `key` hashes the
stage's own config, the keys of its inputs and the stage's code version. A
directory is built in a temporary sibling, sealed by `manifest.json` (every file
with size and sha256), then renamed into place in one atomic step; so after a
kill at any moment an artifact is either complete or absent. A sealed artifact
whose files no longer match the manifest is reported and rebuilt, never used.

Per-study views: `<root>/studies/<name>/tables/<table>.parquet` are relative
symlinks to the sealed Parquet files, so `pl.scan_parquet(".../tables/*.parquet")`
reads a whole study at once.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
import time
import uuid
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import polars as pl
from filelock import FileLock

log = logging.getLogger("rlheal.store")

MANIFEST = "manifest.json"
_TMP, _LOCKS = ".tmp", ".locks"


class StoreError(RuntimeError):
    """The store cannot be used (unwritable root, foreign files); the CLI exits with status 2."""


def stable_hash(obj: Any, length: int = 16) -> str:
    """Short content hash of JSON-able data; key order never matters."""
    text = json.dumps(obj, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:length]


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def write_parquet(df: pl.DataFrame, path: Path) -> Path:
    """Write Parquet atomically: a reader sees the old file, the new file, or nothing."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        df.write_parquet(tmp, compression="zstd", statistics=True)
        os.replace(tmp, path)
    except BaseException:  # a full disk: no half-written temp file left behind
        tmp.unlink(missing_ok=True)
        raise
    return path


def existing_parent(path: str | Path) -> Path:
    """`path` itself if it exists, else the nearest folder above it that does (where a
    store that is not there yet will be made)."""
    p = Path(path).expanduser().absolute()
    while not p.exists() and p != p.parent:
        p = p.parent
    return p


def replace_dir(final: Path, fill: Callable[[Path], Any]) -> Any:
    """Fill a temporary sibling of `final`, then swap it in whole: a reader sees the old
    folder or the new one, never a mix. For outputs rebuilt on every run rather than sealed
    once (the report, replicate comparisons); returns what `fill` returns."""
    final = Path(final)
    tmp = final.with_name(f".{final.name}-{os.getpid()}-{uuid.uuid4().hex[:6]}")
    tmp.mkdir(parents=True)
    try:
        result = fill(tmp)
        old = final.with_name(f".{final.name}-old-{uuid.uuid4().hex[:6]}")
        if final.exists():
            os.rename(final, old)
        os.rename(tmp, final)
        shutil.rmtree(old, ignore_errors=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return result


# Config sections a claim may hold under an older name (issue 16 gave each stage one name):
# compared under the new one, so a changed section is refused even across the rename.
RENAMED_SECTIONS = {"editing": "edit"}
# Fields a claim written before they existed held implicitly: compared at that value, so an
# old study is refused another task (every study before issue 16 played GeneralPoints).
IMPLIED_FIELDS = {"task": "generalpoints"}


def _flatten(d: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        out.update(_flatten(v, f"{prefix}{k}.") if isinstance(v, Mapping) else {f"{prefix}{k}": v})
    return out


@dataclass(frozen=True)
class Artifact:
    """Address of one stage output. `path` is where it lives once sealed. An artifact made by
    `Store.artifact` also carries what its key hashes (`config`, `inputs`: the ids of the
    artifacts it reads), which sealing records in its manifest; two artifacts are equal
    when their addresses are."""

    root: Path
    stage: str
    key: str
    config: Mapping[str, Any] = field(default_factory=dict, compare=False, repr=False)
    inputs: tuple[str, ...] = field(default=(), compare=False, repr=False)

    @property
    def path(self) -> Path:
        return self.root / self.stage / self.key

    @property
    def id(self) -> str:
        return f"{self.stage}-{self.key}"

    def step(self, step: int) -> Artifact:
        """The artifact of one saved step of a training run (`<key>-s<step>`), sealed on its own
        as the run goes, so a kill keeps every step already written."""
        return Artifact(self.root, self.stage, f"{self.key}-s{step}")

    @property
    def work_dir(self) -> Path:
        """A training run's resume point (`<stage>/.work/<key>/`): outside the sealed folders,
        kept across kills, deleted once the run is sealed."""
        return self.root / self.stage / ".work" / self.key

    def __str__(self) -> str:
        return str(self.path)


class Store:
    def __init__(self, root: str | Path):
        self.root = Path(root).expanduser().absolute()
        # (file, size, mtime_ns) already hashed in this process: large checkpoints are
        # verified once per process, not on every cache look-up.
        self._verified: set[tuple[str, int, int]] = set()

    # ------------------------------------------------------------------ addressing
    def artifact(self, stage: str, config: Mapping[str, Any], inputs: Iterable[str] = (), version: str = "1") -> Artifact:
        inputs = tuple(sorted(inputs))
        key = stable_hash({"stage": stage, "version": version, "config": config, "inputs": list(inputs)})
        return Artifact(self.root, stage, key, config, inputs)

    @staticmethod
    def from_path(path: str | Path) -> Artifact:
        p = Path(path)
        return Artifact(p.parent.parent, p.parent.name, p.name)

    def check_writable(self) -> None:
        """Fail early, before any work, if the store cannot be used (creates the store)."""
        try:
            self.root.mkdir(parents=True, exist_ok=True)
            probe = self.root / f".probe-{os.getpid()}"
            probe.write_bytes(b"")
            probe.unlink()
        except OSError as err:
            raise StoreError(f"{self.root}: store is not writable ({err.strerror or err})") from None

    def check_usable(self) -> None:
        """`check_writable` without leaving anything behind (`rlheal validate`, and `run` before
        it writes): the store, or the nearest folder above it that exists, must be a folder
        in which a folder can be made, proven by making and removing one."""
        parent = existing_parent(self.root)
        if not parent.is_dir():
            raise StoreError(f"{self.root}: store is not writable ({parent} is not a directory)")
        try:
            os.rmdir(tempfile.mkdtemp(prefix=".rlheal-probe-", dir=parent))
        except OSError as err:
            raise StoreError(f"{self.root}: store is not writable ({err.strerror or err} in {parent})") from None

    # ------------------------------------------------------------------ validity
    def problem(self, art: Artifact | Path) -> str | None:
        """Why the artifact cannot be used (None = sealed and intact)."""
        path = art.path if isinstance(art, Artifact) else Path(art)
        manifest = path / MANIFEST
        if not manifest.is_file():
            return "missing" if not path.exists() else "no manifest"
        try:
            meta_all = json.loads(manifest.read_text())
            files = meta_all["files"]
        except (OSError, ValueError, KeyError, TypeError):
            return "unreadable manifest"
        # Artifacts sealed separately but owned by this one (SFT checkpoints of a run):
        # a damaged part makes the whole artifact unusable, so it is rebuilt with it.
        for part in meta_all.get("parts", []):  # paths relative to the store root
            if (why := self.problem(path.parent.parent / part)) is not None:
                return f"part {Path(part).name}: {why}"
        for rel, meta in files.items():
            f = path / rel
            try:
                st = f.stat()
            except OSError:
                return f"missing file {rel}"
            if st.st_size != meta["size"]:
                return f"size of {rel} is {st.st_size}, manifest says {meta['size']}"
            stamp = (str(f), st.st_size, st.st_mtime_ns)
            if stamp not in self._verified:
                if sha256_file(f) != meta["sha256"]:
                    return f"checksum of {rel} does not match the manifest"
                self._verified.add(stamp)
        return None

    def is_sealed(self, art: Artifact | Path) -> bool:
        return self.problem(art) is None

    def manifest(self, art: Artifact | Path) -> dict[str, Any]:
        path = art.path if isinstance(art, Artifact) else Path(art)
        return json.loads((path / MANIFEST).read_text())

    # ------------------------------------------------------------------ building
    def lock(self, art: Artifact) -> FileLock:
        d = self.root / art.stage / _LOCKS
        d.mkdir(parents=True, exist_ok=True)
        return FileLock(d / f"{art.key}.lock")

    def build(
        self,
        art: Artifact,
        builder: Callable[[Path], Mapping[str, Any] | None],
        config: Mapping[str, Any] | None = None,
        inputs: Iterable[str] | None = None,
    ) -> Path:
        """Return the sealed artifact, building it with `builder(tmp_dir)` if needed.

        A file lock makes concurrent processes build each artifact once; the loser
        of the race finds it sealed. `builder` may return extra manifest fields. The
        manifest records `config` and `inputs`, by default what the artifact's key hashes.
        """
        with self.lock(art):
            why = self.problem(art)
            if why is None:
                return art.path
            if why != "missing":
                log.warning("artifact %s is damaged (%s): rebuilding it", art.path, why)
                shutil.rmtree(art.path, ignore_errors=True)
            tmp_root = self.root / art.stage / _TMP
            # Leftovers of a killed build of this key: safe to remove while we hold its lock.
            for stale in tmp_root.glob(f"{art.key}-*"):
                shutil.rmtree(stale, ignore_errors=True)
            tmp = tmp_root / f"{art.key}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
            tmp.mkdir(parents=True)
            try:
                t0 = time.time()
                extra = builder(tmp)
                extra = extra if isinstance(extra, Mapping) else {}
                self._seal(tmp, art, art.config if config is None else config, list(art.inputs if inputs is None else inputs), time.time() - t0, extra)
                os.rename(tmp, art.path)
            except BaseException:
                shutil.rmtree(tmp, ignore_errors=True)
                raise
            return art.path

    def _seal(self, tmp: Path, art: Artifact, config: Mapping[str, Any], inputs: list[str], seconds: float, extra: Mapping[str, Any]) -> None:
        files = {}
        for f in sorted(p for p in tmp.rglob("*") if p.is_file()):
            rel = f.relative_to(tmp).as_posix()
            digest = sha256_file(f)
            files[rel] = {"size": f.stat().st_size, "sha256": digest}
        manifest = {
            "stage": art.stage,
            "key": art.key,
            "config": config,
            "inputs": inputs,
            "files": files,
            "created_at": datetime.now(timezone.utc).isoformat(),
            "build_seconds": round(seconds, 3),
            **extra,
        }
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=1, sort_keys=True, default=str))

    # ------------------------------------------------------------------ study views
    def study_dir(self, study: str) -> Path:
        return self.root / "studies" / study

    def tables_dir(self, study: str) -> Path:
        """`studies/<study>/tables/`: one `<table>.parquet` per study table."""
        return self.study_dir(study) / "tables"

    def report_dir(self, study: str) -> Path:
        """`studies/<study>/report/`: the report, redrawn whenever the tables or the code that draws it change."""
        return self.study_dir(study) / "report"

    def replicates_dir(self, studies: Iterable[str]) -> Path:
        """Where `rlheal compare` writes its comparison of these studies."""
        return self.root / "replicates" / "+".join(studies)

    def claim_study(self, study: str, config: Mapping[str, Any], force: bool = False) -> None:
        """A study name in a store stands for one config: a changed config is refused (its
        tables would mix with the old ones) unless `force` points the study at it."""
        self.check_claim(study, config, force)
        record = self.study_dir(study) / "config.json"
        record.parent.mkdir(parents=True, exist_ok=True)
        tmp = record.with_name(f".config.{os.getpid()}.tmp")
        try:
            tmp.write_text(json.dumps(config, indent=1, sort_keys=True, default=str))
            os.replace(tmp, record)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise

    def check_claim(self, study: str, config: Mapping[str, Any], force: bool = False) -> None:
        """`claim_study`'s refusal alone, writing nothing."""
        record = self.study_dir(study) / "config.json"
        if record.is_file() and not force:
            old = IMPLIED_FIELDS | {RENAMED_SECTIONS.get(k, k): v for k, v in json.loads(record.read_text()).items()}
            before, now = _flatten(old), _flatten(json.loads(json.dumps(config, default=str)))
            # Fields only one side has came or went with a new rlheal version (a new section, a
            # field moved into one): not a change of the study's config, which both sides share.
            changed = [f"{k}: {before[k]!r} -> {now[k]!r}" for k in sorted(before) if k in now and before[k] != now[k]]
            if changed:
                raise StoreError(
                    f"{record}: study {study!r} was run with another config; changed: " + "; ".join(changed[:8])
                    + ". Use a new study name, or --force to point the study at this config."
                )

    def publish(self, study: str, table: str, file: Path) -> Path:
        """Expose a sealed Parquet file as `studies/<study>/tables/<table>.parquet` (atomic symlink swap)."""
        tables = self.tables_dir(study)
        tables.mkdir(parents=True, exist_ok=True)
        link = tables / f"{table}.parquet"
        tmp = tables / f".{table}.{os.getpid()}.{uuid.uuid4().hex[:8]}"
        os.symlink(os.path.relpath(Path(file).absolute(), tables), tmp)
        os.replace(tmp, link)
        return link

    def publish_all(self, study: str, artifact_dir: Path, tables: Iterable[str]) -> None:
        for table in tables:
            self.publish(study, table, Path(artifact_dir) / f"{table}.parquet")

    def unpublish(self, study: str, tables: Iterable[str]) -> None:
        """Withdraw tables a study no longer makes (a stage turned off): the report must not
        judge from an earlier config's."""
        for table in tables:
            (self.tables_dir(study) / f"{table}.parquet").unlink(missing_ok=True)

    def table(self, study: str, table: str) -> pl.LazyFrame:
        return pl.scan_parquet(self.tables_dir(study) / f"{table}.parquet")
