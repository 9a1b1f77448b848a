"""The lake: the one store every artifact is written to and read from (DESIGN §2).

Layout under the root URL (a local folder or ``s3://bucket/prefix``, both through fsspec)::

    <root>/<kind>/<version>/...files...          the artifact's files
    <root>/<kind>/<version>/_MANIFEST.json       written last: the commit
    <root>/<kind>/<version>/_lease/<gen>.json    who is producing it (fencing generations)
    <root>/<kind>/<version>/_work/...            work in progress, resume markers
    <root>/<kind>/_aliases/<name>.json           a name (``latest``, a tag) -> a version

A version is a content address: the first 16 hex digits of the sha256 of the canonical JSON of
{kind, params, inputs, code_version}. Nothing about where the lake lives enters the hash.

Readers only ever see committed versions: a version folder without a manifest does not exist.
The manifest is written to a temporary name and moved into place, which is atomic on a local
disk (rename) and on S3 (a single PUT/COPY of one object).
"""

from __future__ import annotations

import contextlib
import datetime as dt
import hashlib
import json
import os
import re
import socket
import threading
import time
import uuid
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator

import fsspec

from tasks.errors import BadInput

MANIFEST = "_MANIFEST.json"
ALIASES = "_aliases"
LEASES = "_lease"
WORK = "_work"
PROBES = "_probes"
LATEST = "latest"

_NAME = re.compile(r"^[a-z][a-z0-9_-]{0,63}$")          # kinds
_ALIAS = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")  # aliases (no '/', no leading '.')
_VERSION = re.compile(r"^[0-9a-f]{16}$")


class LakeError(BadInput):
    """A problem a user can act on (a ref, a lake URL, credentials): one line, exit 2."""


class LeaseLost(LakeError):
    """Another producer took over our lease: we must not commit."""


# --------------------------------------------------------------------------- names and refs


def check_kind(kind: str) -> str:
    if not isinstance(kind, str) or not _NAME.match(kind):
        raise LakeError(f"invalid artifact kind {kind!r}: use lowercase letters, digits, '-' or '_'")
    return kind


def check_alias(name: str) -> str:
    if not isinstance(name, str) or not _ALIAS.match(name) or ".." in name:
        raise LakeError(
            f"invalid alias {name!r}: use letters, digits, '.', '-' or '_' "
            "(no '/', no '..', no absolute path)"
        )
    return name


@dataclass(frozen=True)
class Ref:
    """``kind@version``, ``kind@alias`` or ``kind`` (= ``kind@latest``)."""

    kind: str
    label: str = LATEST  # a version or an alias

    @classmethod
    def parse(cls, text: str) -> "Ref":
        if not isinstance(text, str) or not text or text.count("@") > 1:
            raise LakeError(f"malformed ref {text!r}: expected KIND, KIND@VERSION or KIND@ALIAS")
        kind, _, label = text.partition("@")
        if _ and not label:
            raise LakeError(f"malformed ref {text!r}: nothing after '@'")
        check_kind(kind)
        label = label or LATEST
        if not _VERSION.match(label):
            check_alias(label)
        return cls(kind, label)

    @property
    def is_version(self) -> bool:
        return bool(_VERSION.match(self.label))

    def __str__(self) -> str:
        return f"{self.kind}@{self.label}"


def canonical_json(obj: Any) -> str:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False, default=str)


def version_of(kind: str, params: dict, inputs: list[str], code_version: str) -> str:
    """The content address of an artifact: same recipe -> same version, wherever the lake is."""
    recipe = {"kind": kind, "params": params, "inputs": sorted(inputs), "code_version": code_version}
    return hashlib.sha256(canonical_json(recipe).encode()).hexdigest()[:16]


def now_iso() -> str:
    return dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")


# --------------------------------------------------------------------------- manifest


@dataclass
class Manifest:
    kind: str
    version: str
    params: dict
    inputs: list[str]
    files: list[dict]
    metrics: dict
    created_at: str
    flow_run_id: str | None
    code_version: str

    @property
    def ref(self) -> str:
        return f"{self.kind}@{self.version}"

    def to_json(self) -> dict:
        return {
            "kind": self.kind, "version": self.version, "params": self.params,
            "inputs": self.inputs, "files": self.files, "metrics": self.metrics,
            "created_at": self.created_at, "flow_run_id": self.flow_run_id,
            "code_version": self.code_version,
        }

    @classmethod
    def from_json(cls, data: dict, where: str) -> "Manifest":
        try:
            return cls(**{k: data[k] for k in cls.__dataclass_fields__})
        except (KeyError, TypeError) as e:
            raise LakeError(f"unreadable manifest {where}: missing or bad field {e}") from None


# --------------------------------------------------------------------------- the store


SECRET_BLOCK_ENV = "CRAWL2MODEL_S3_SECRET_BLOCK"


def s3_credentials() -> dict[str, str]:
    """S3 credentials from the Prefect Secret block named by $CRAWL2MODEL_S3_SECRET_BLOCK (read
    through the runtime: tasks/report.py), as
    botocore environment variables; {} when it is not set (botocore then reads the environment,
    a profile or an instance role). The block's value is JSON: {"aws_access_key_id": ...,
    "aws_secret_access_key": ..., "aws_session_token": ... (optional)}."""
    name = os.environ.get(SECRET_BLOCK_ENV)
    if not name:
        return {}
    try:
        from tasks.report import runtime

        value = runtime().secret(name)
    except Exception as e:  # unknown block, no Prefect API
        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise LakeError(f"cannot load the Prefect Secret block {name!r} (${SECRET_BLOCK_ENV}): {msg}") from None
    keys = {"aws_access_key_id", "aws_secret_access_key"}
    if not isinstance(value, dict) or not keys <= set(value):
        raise LakeError(f"Prefect Secret block {name!r} (${SECRET_BLOCK_ENV}) must hold JSON with "
                        "aws_access_key_id and aws_secret_access_key")
    return {k.upper(): str(v) for k, v in value.items()
            if k in keys | {"aws_session_token"} and v}


def _fs_for(url: str):
    """One fsspec filesystem for a root URL. S3 endpoint and credentials come from the
    environment (AWS_ENDPOINT_URL, AWS_ACCESS_KEY_ID, ...) or a Prefect Secret block named there,
    never from parameters we store."""
    options: dict[str, Any] = {}
    if url.startswith(("s3://", "s3a://")):
        # Listings must be fresh: another process may have just committed a version.
        options["use_listings_cache"] = False
        options["skip_instance_cache"] = True
        endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
        if endpoint:
            options["client_kwargs"] = {"endpoint_url": endpoint}
        creds = s3_credentials()
        if creds:
            options.update(key=creds["AWS_ACCESS_KEY_ID"], secret=creds["AWS_SECRET_ACCESS_KEY"],
                           token=creds.get("AWS_SESSION_TOKEN"))
    elif "://" not in url or url.startswith("file://"):
        options["auto_mkdir"] = True
    fs, root = fsspec.core.url_to_fs(url, **options)
    return fs, root.rstrip("/")


class Lake:
    def __init__(self, url: str | None = None):
        self.url = (url or os.environ.get("CRAWL2MODEL_LAKE") or "./lake").rstrip("/") or "/"
        self.fs, self.root = _fs_for(self.url)
        self.is_local = "file" in tuple(self.fs.protocol)

    def __repr__(self) -> str:
        return f"Lake({self.url!r})"

    # -- paths ---------------------------------------------------------------
    def path(self, *parts: str) -> str:
        return "/".join([self.root, *parts])

    def uri(self, *parts: str) -> str:
        """A URL other tools (datatrove, pyarrow, torch loaders) can open."""
        return self.fs.unstrip_protocol(self.path(*parts)) if not self.is_local else self.path(*parts)

    def data_folder(self, path: str):
        """datatrove's view of a folder of the lake (`path` from `path()` or `Production.path()`).
        An object store has no folders to make: datatrove's auto_mkdir would ask S3 whether the
        bucket exists before every file it writes (278 of a demo pipeline's 1,892 requests)."""
        from datatrove.io import DataFolder

        return DataFolder(path, fs=self.fs, auto_mkdir=self.is_local)

    # -- low-level I/O with errors that name the lake ------------------------
    @contextlib.contextmanager
    def _io(self, what: str):
        try:
            yield
        except LakeError:
            raise
        except FileNotFoundError:
            raise
        except PermissionError as e:
            raise LakeError(f"permission denied in lake {self.url} while {what}: {e}") from None
        except Exception as e:  # network errors, missing bucket, bad endpoint...
            msg = str(e).splitlines()[0] if str(e) else type(e).__name__
            raise LakeError(f"cannot reach lake {self.url} while {what}: {msg}") from None

    def _read_json(self, path: str, what: str) -> dict | None:
        with self._io(f"reading {what}"):
            try:
                raw = self.fs.cat_file(path)
            except FileNotFoundError:
                return None
        try:
            data = json.loads(raw)
            if not isinstance(data, dict):
                raise ValueError("not a JSON object")
            return data
        except (ValueError, UnicodeDecodeError) as e:
            raise LakeError(f"unreadable {what} {self.uri_of(path)}: {e}") from None

    def uri_of(self, path: str) -> str:
        return path if self.is_local else self.fs.unstrip_protocol(path)

    def _write_json_atomic(self, path: str, data: dict) -> None:
        """Write to a temporary name, then move into place: readers see all or nothing."""
        tmp = f"{path}.tmp-{uuid.uuid4().hex}"
        with self._io(f"writing {path}"):
            self.fs.pipe_file(tmp, (json.dumps(data, indent=2, sort_keys=True) + "\n").encode())
            self.fs.mv(tmp, path)

    def _create_exclusive(self, path: str, data: dict) -> bool:
        """Create ``path`` only if it does not exist; True if we created it."""
        body = (json.dumps(data, indent=2, sort_keys=True) + "\n").encode()
        with self._io(f"creating {path}"):
            if self.is_local:
                # O_EXCL then write would let a reader see the file empty: write it aside, then
                # hard-link it into place (atomic, and fails if the name exists)
                tmp = f"{path}.tmp-{uuid.uuid4().hex}"
                self.fs.pipe_file(tmp, body)
                try:
                    os.link(tmp, path)
                    return True
                except FileExistsError:
                    return False
                finally:
                    os.remove(tmp)
            try:  # a conditional PUT (If-None-Match: *) on S3: atomic
                with self.fs.open(path, "xb") as f:
                    f.write(body)
                return True
            except FileExistsError:
                return False

    def _ls(self, path: str) -> list[str]:
        with self._io(f"listing {path}"):
            try:
                return [p.rstrip("/") for p in self.fs.ls(path, detail=False)]
            except FileNotFoundError:
                return []

    def files_under(self, path: str) -> list[str]:
        """Every object below a folder. (On S3 a deleted folder can still appear in listings
        as an empty prefix; it holds no objects and is ignored.)"""
        with self._io(f"listing {path}"):
            try:
                return sorted(p for p in self.fs.find(path) if p.rstrip("/") != path)
            except FileNotFoundError:
                return []

    def check_reachable(self) -> None:
        """Fail with a clear message when the root cannot be used at all."""
        with self._io("checking the root"):
            if self.is_local:
                if not self.fs.exists(self.root):
                    raise LakeError(f"lake {self.url} does not exist (nothing has been produced yet?)")
                if not self.fs.isdir(self.root):
                    raise LakeError(f"lake {self.url} is not a directory")
            else:
                bucket = self.root.split("/", 1)[0]
                if not self.fs.exists(bucket):
                    raise LakeError(f"cannot reach lake {self.url}: bucket {bucket!r} does not exist")

    # -- writing files (a Production's, or a worker's on its behalf) ------------
    @contextlib.contextmanager
    def write_file(self, path: str, what: str) -> Iterator[Any]:
        """A binary file at `path`, hashed as it is written: `digest()` of what was yielded gives
        (sha256, bytes) once the block ends. Only storage calls are wrapped in `_io`: an exception
        the caller raises inside the block (a bug in a stage, say) passes through as itself."""
        h, size = hashlib.sha256(), 0
        with self._io(what):
            f = self.fs.open(path, "wb")
        lake = self

        class _Hashing:
            def write(_, data: bytes) -> int:
                nonlocal size
                h.update(data)
                size += len(data)
                with lake._io(what):
                    return f.write(data)

            def digest(_) -> tuple[str, int]:
                return h.hexdigest(), size

            def __getattr__(_, attr):
                return getattr(f, attr)
        try:
            yield _Hashing()
        except BaseException:
            with contextlib.suppress(Exception):
                f.close()
            raise
        with self._io(what):
            f.close()

    def upload(self, local_path: str, path: str, what: str | None = None) -> tuple[str, int]:
        """Copy a local file to `path` in the lake; returns its (sha256, bytes)."""
        with open(local_path, "rb") as src, self.write_file(path, what or f"writing {path}") as dst:
            while chunk := src.read(1 << 20):
                dst.write(chunk)
        return dst.digest()

    def write_probe(self) -> str:
        """A small file that other machines (a Ray cluster's nodes) look for, to tell whether they
        see this lake; `remove_probe` it after. Under `_probes/`, which is no kind."""
        path = self.path(PROBES, uuid.uuid4().hex)
        with self._io("writing a probe file"):
            self.fs.pipe_file(path, b"crawl2model: can this machine see the lake?\n")
        return path

    def remove_probe(self, path: str) -> None:
        with contextlib.suppress(Exception):
            self.fs.rm_file(path)

    # -- reading ---------------------------------------------------------------
    def kinds(self) -> list[str]:
        names = [p.rsplit("/", 1)[-1] for p in self._ls(self.root)]
        return sorted(n for n in names if _NAME.match(n))

    def _version_dirs(self, kind: str) -> list[str]:
        names = [p.rsplit("/", 1)[-1] for p in self._ls(self.path(check_kind(kind)))]
        return sorted(n for n in names if _VERSION.match(n))

    def manifest(self, kind: str, version: str) -> Manifest | None:
        where = self.path(kind, version, MANIFEST)
        data = self._read_json(where, "manifest")
        return None if data is None else Manifest.from_json(data, self.uri_of(where))

    def versions(self, kind: str) -> list[Manifest]:
        """Committed versions of a kind, oldest first."""
        found = [m for v in self._version_dirs(kind) if (m := self.manifest(kind, v))]
        return sorted(found, key=lambda m: (m.created_at, m.version))

    def aliases(self, kind: str) -> dict[str, str]:
        out = {}
        for p in self._ls(self.path(check_kind(kind), ALIASES)):
            name = p.rsplit("/", 1)[-1]
            if name.endswith(".json") and _ALIAS.match(name[:-5]):
                data = self._read_json(p, "alias")
                if data and _VERSION.match(str(data.get("version", ""))):
                    out[name[:-5]] = data["version"]
        return out

    def resolve(self, ref: str | Ref) -> Manifest:
        """A ref -> its committed manifest, or a LakeError that says what is missing."""
        r = Ref.parse(ref) if isinstance(ref, str) else ref
        version = r.label
        if not r.is_version:
            data = self._read_json(self.path(r.kind, ALIASES, f"{r.label}.json"), "alias")
            if data is None:
                if not self._ls(self.path(r.kind)):
                    raise LakeError(f"unknown artifact kind {r.kind!r} in lake {self.url}")
                raise LakeError(f"unknown alias {r} in lake {self.url}")
            version = str(data.get("version", ""))
            if not _VERSION.match(version):
                raise LakeError(f"unreadable alias {r}: bad version {version!r}")
        m = self.manifest(r.kind, version)
        if m is None:
            if not self._ls(self.path(r.kind)):
                raise LakeError(f"unknown artifact kind {r.kind!r} in lake {self.url}")
            raise LakeError(f"unknown version {r.kind}@{version} in lake {self.url}")
        return m

    def exists(self, kind: str, version: str) -> bool:
        return self.manifest(kind, version) is not None

    def lineage(self, ref: str | Ref) -> dict:
        """The tree of inputs under a ref: {"ref": ..., "inputs": [subtrees]}."""
        m = self.resolve(ref)
        return {"ref": m.ref, "created_at": m.created_at,
                "inputs": [self.lineage(i) for i in m.inputs]}

    def open(self, ref: str | Ref | Manifest, name: str, mode: str = "rb"):
        m = ref if isinstance(ref, Manifest) else self.resolve(ref)
        return self.fs.open(self.path(m.kind, m.version, safe_relpath(name)), mode)

    def file_uri(self, m: Manifest, name: str) -> str:
        return self.uri(m.kind, m.version, safe_relpath(name))

    def verify(self, ref: str | Ref | Manifest) -> list[str]:
        """Recompute every file's sha256; return the names that do not match."""
        m = ref if isinstance(ref, Manifest) else self.resolve(ref)
        bad = []
        for f in m.files:
            try:
                digest, size = self._hash(self.path(m.kind, m.version, f["path"]))
            except FileNotFoundError:
                bad.append(f["path"])
                continue
            if digest != f["sha256"] or size != f["bytes"]:
                bad.append(f["path"])
        return bad

    def _hash(self, path: str) -> tuple[str, int]:
        h, n = hashlib.sha256(), 0
        with self.fs.open(path, "rb") as f:
            while chunk := f.read(1 << 20):
                h.update(chunk)
                n += len(chunk)
        return h.hexdigest(), n

    # -- aliases ----------------------------------------------------------------
    def tag(self, ref: str | Ref, name: str) -> Manifest:
        m = self.resolve(ref)
        self._set_alias(m.kind, check_alias(name), m.version)
        return m

    def _set_alias(self, kind: str, name: str, version: str) -> None:
        self._write_json_atomic(self.path(kind, ALIASES, f"{name}.json"),
                                {"version": version, "updated_at": now_iso()})

    # -- writing ------------------------------------------------------------------
    def produce(self, kind: str, params: dict, inputs: list[str], code_version: str, *,
                lease_ttl: float = 60.0, wait_timeout: float = 24 * 3600.0,
                flow_run_id: str | None = None, rebuild: bool = False) -> "Production":
        """Start (or join) the production of one version. Use as a context manager::

            with lake.produce("filter", params, ["download@ab12..."], "1") as p:
                if p.cached:             # committed already (by us earlier, or a racer)
                    return p.manifest
                ...write files under p.path(...)...
                p.metrics["documents"] = n
            p.manifest                   # committed on a clean exit, never on an exception
        """
        check_kind(kind)
        resolved = [self.resolve(i).ref for i in inputs]
        version = version_of(kind, params, resolved, code_version)
        return Production(self, kind, version, params, resolved, code_version,
                          lease_ttl, wait_timeout, flow_run_id, rebuild=rebuild)

    # -- garbage collection --------------------------------------------------------
    def gc(self, dry_run: bool = False) -> dict[str, list[str]]:
        """Delete uncommitted leftovers (no manifest, no live lease) and committed versions
        that no alias reaches through lineage. Returns what was (or would be) deleted."""
        reachable: set[str] = set()

        def walk(ref: str) -> None:
            if ref in reachable:
                return
            reachable.add(ref)
            try:
                m = self.resolve(ref)
            except LakeError:
                return
            for i in m.inputs:
                walk(i)

        kinds = self.kinds()
        for kind in kinds:
            for version in self.aliases(kind).values():
                walk(f"{kind}@{version}")

        out: dict[str, list[str]] = {"uncommitted": [], "unreachable": [], "temporary": []}
        for kind in kinds:
            for version in self._version_dirs(kind):
                d = self.path(kind, version)
                if self.manifest(kind, version) is None:
                    if self._live_lease(d) is None and self.files_under(d):
                        out["uncommitted"].append(f"{kind}@{version}")
                elif f"{kind}@{version}" not in reachable:
                    out["unreachable"].append(f"{kind}@{version}")
            for p in self._ls(self.path(kind, ALIASES)):
                if ".tmp-" in p.rsplit("/", 1)[-1]:
                    out["temporary"].append(p)
        if not dry_run:
            with self._io("collecting garbage"):
                for key in ("uncommitted", "unreachable"):
                    for ref in out[key]:
                        kind, version = ref.split("@")
                        if key == "unreachable":  # un-commit first: never a half-deleted version
                            self.fs.rm_file(self.path(kind, version, MANIFEST))
                        self.fs.rm(self.path(kind, version), recursive=True)
                for p in out["temporary"]:
                    self.fs.rm_file(p)
        return out

    # -- leases --------------------------------------------------------------------
    def _leases(self, version_dir: str) -> list[tuple[int, str]]:
        out = []
        for p in self._ls(f"{version_dir}/{LEASES}"):
            name = p.rsplit("/", 1)[-1]
            if name.endswith(".json") and name[:-5].isdigit():
                out.append((int(name[:-5]), p))
        return sorted(out)

    def _live_lease(self, version_dir: str) -> dict | None:
        leases = self._leases(version_dir)
        if not leases:
            return None
        data = self._read_json(leases[-1][1], "lease") or {}
        return None if _lease_is_stale(data) else data


def _lease_is_stale(lease: dict) -> bool:
    if float(lease.get("expires_at", 0)) < time.time():
        return True
    # Same machine: a dead owner process is stale at once (no need to wait for the TTL).
    if lease.get("host") == socket.gethostname() and isinstance(lease.get("pid"), int):
        try:
            os.kill(lease["pid"], 0)
        except ProcessLookupError:
            return True
        except PermissionError:
            return False
    return False


def safe_relpath(name: str) -> str:
    """A file name inside a version: relative, no '..', no empty parts."""
    parts = name.replace("\\", "/").split("/")
    if not name or name.startswith("/") or any(p in ("", ".", "..") for p in parts) or ":" in parts[0]:
        raise LakeError(f"invalid file name {name!r} in an artifact: must be a relative path without '..'")
    return "/".join(parts)


# --------------------------------------------------------------------------- production


@dataclass
class Production:
    lake: Lake
    kind: str
    version: str
    params: dict
    inputs: list[str]
    code_version: str
    lease_ttl: float
    wait_timeout: float
    flow_run_id: str | None
    metrics: dict = field(default_factory=dict)
    manifest: Manifest | None = None
    cached: bool = False
    resumed: bool = False  # took over from an earlier producer that died
    _gen: int = 0
    _lease_path: str = ""
    written: dict = field(default_factory=dict)
    _stop: threading.Event = field(default_factory=threading.Event)
    _heartbeat: threading.Thread | None = None
    _lost: bool = False
    on_wait: Callable[[dict], None] | None = None
    rebuild: bool = False  # build again even if committed: un-commit first, then start clean

    @property
    def ref(self) -> str:
        return f"{self.kind}@{self.version}"

    @property
    def dir(self) -> str:
        return self.lake.path(self.kind, self.version)

    def path(self, name: str) -> str:
        return f"{self.dir}/{safe_relpath(name)}"

    def uri(self, name: str = "") -> str:
        return self.lake.uri(self.kind, self.version, *([safe_relpath(name)] if name else []))

    # -- lease protocol: generation files created exclusively; the highest live one owns it
    def _lease_body(self) -> dict:
        return {"host": socket.gethostname(), "pid": os.getpid(), "token": self._token,
                "acquired_at": now_iso(), "expires_at": time.time() + self.lease_ttl}

    def __enter__(self) -> "Production":
        self._token = uuid.uuid4().hex
        deadline = time.time() + self.wait_timeout
        while True:
            existing = self.lake.manifest(self.kind, self.version)
            if existing is not None and not self.rebuild:
                # A cache hit is what the user asked for now: `latest` follows it, so the
                # next stage's default input is the one just requested.
                self.manifest, self.cached = existing, True
                self.lake._set_alias(self.kind, LATEST, self.version)
                return self
            leases = self.lake._leases(self.dir)
            top = leases[-1] if leases else None
            holder = self.lake._read_json(top[1], "lease") if top else None
            if top is None or _lease_is_stale(holder or {}):
                gen = top[0] + 1 if top else 1
                path = f"{self.dir}/{LEASES}/{gen:08d}.json"
                if self._create_lease(path, gen):
                    self.resumed = top is not None
                    if self.rebuild:
                        self._clear()
                        self.rebuild, self.resumed = False, False
                    # A racer may have committed between our check and our lease.
                    if self.lake.manifest(self.kind, self.version) is not None:
                        self._release()
                        continue
                    self._start_heartbeat()
                    return self
                continue  # somebody else got this generation: look again
            if time.time() > deadline:
                raise LakeError(f"timed out waiting for {self.ref}, being produced by "
                                f"pid {holder.get('pid')} on {holder.get('host')}")
            if self.on_wait:
                self.on_wait(holder or {})
            time.sleep(0.2)

    def _create_lease(self, path: str, gen: int) -> bool:
        if not self.lake._create_exclusive(path, self._lease_body()):
            # On S3 a conditional PUT whose reply was lost is retried and then fails with 412
            # although *our* first attempt created the file: the token tells.
            mine = self.lake._read_json(path, "lease")
            if not mine or mine.get("token") != self._token:
                return False
        self._gen, self._lease_path = gen, path
        return True

    def _clear(self) -> None:
        """Un-commit (manifest first: readers never see a half-deleted version), then remove
        every file and work-in-progress marker of the version, keeping our lease."""
        with self.lake._io(f"clearing {self.ref} for a rebuild"):
            manifest = self.lake.path(self.kind, self.version, MANIFEST)
            if self.lake.fs.exists(manifest):
                self.lake.fs.rm_file(manifest)
            for p in self.lake.files_under(self.dir):
                if f"/{LEASES}/" not in p:
                    self.lake.fs.rm_file(p)

    def _start_heartbeat(self) -> None:
        def beat() -> None:
            while not self._stop.wait(self.lease_ttl / 3):
                try:
                    if not self._owns_lease():
                        self._lost = True
                        return
                    self.lake._write_json_atomic(self._lease_path, self._lease_body())
                except Exception:  # a missed beat is retried; expiry is the safety net
                    pass

        self._heartbeat = threading.Thread(target=beat, name=f"lease-{self.ref}", daemon=True)
        self._heartbeat.start()

    def _owns_lease(self) -> bool:
        leases = self.lake._leases(self.dir)
        return bool(leases) and leases[-1][0] == self._gen

    def _release(self) -> None:
        self._stop.set()
        if self._heartbeat:
            self._heartbeat.join(timeout=5)
        if self._lease_path:
            with contextlib.suppress(Exception):
                self.lake.fs.rm(f"{self.dir}/{LEASES}", recursive=True)
            self._lease_path = ""

    def write_bytes(self, name: str, data: bytes) -> None:
        with self.open(name, "wb") as f:
            f.write(data)

    @contextlib.contextmanager
    def open(self, name: str, mode: str = "wb") -> Iterator[Any]:
        """Open a file of this version for writing, hashing it as it is written."""
        if "w" not in mode or "b" not in mode:
            raise ValueError("Production.open writes binary files; read through Lake.open")
        with self.lake.write_file(self.path(name), f"writing {name}") as f:
            yield f
        self.written[safe_relpath(name)] = f.digest()

    def adopt(self, name: str, sha256: str, size: int) -> None:
        """A file of this version that a worker elsewhere (a Ray task) wrote with `Lake.upload`."""
        self.written[safe_relpath(name)] = (sha256, size)

    def add_file(self, local_path: str, name: str, sha256: str, move: bool = False) -> None:
        """Bring a finished local file into this version. `sha256` is its known digest (the
        caller verified it); `move` renames instead of copying when the lake is local."""
        if move and self.lake.is_local:
            with self.lake._io(f"moving {name} into the lake"):
                dest = self.path(name)
                os.makedirs(os.path.dirname(dest), exist_ok=True)
                os.replace(local_path, dest)
            self.written[safe_relpath(name)] = (sha256, os.path.getsize(dest))
            return
        self.put_file(local_path, name)
        if self.written[safe_relpath(name)][0] != sha256:
            raise LakeError(f"{name}: changed while it was copied into the lake")

    def put_file(self, local_path: str, name: str) -> None:
        self.written[safe_relpath(name)] = self.lake.upload(local_path, self.path(name), f"writing {name}")

    def _file_list(self) -> list[dict]:
        base, files = self.dir, []
        for full in self.lake.files_under(base):
            rel = full[len(base) + 1:] if full.startswith(base + "/") else full
            if any(part.startswith("_") for part in rel.split("/")):
                continue  # manifest, leases, work in progress: not part of the artifact
            digest, size = self.written.get(rel) or self.lake._hash(full)
            files.append({"path": rel, "bytes": size, "sha256": digest})
        return files

    def commit(self) -> Manifest:
        if self._lost or not self._owns_lease():
            raise LeaseLost(f"lost the lease on {self.ref} to another producer; not committing")
        m = Manifest(kind=self.kind, version=self.version, params=self.params, inputs=self.inputs,
                     files=self._file_list(), metrics=self.metrics, created_at=now_iso(),
                     flow_run_id=self.flow_run_id, code_version=self.code_version)
        self.lake._write_json_atomic(self.lake.path(self.kind, self.version, MANIFEST), m.to_json())
        self.lake._set_alias(self.kind, LATEST, self.version)
        # Work-in-progress markers are not needed once committed.
        with contextlib.suppress(Exception):
            self.lake.fs.rm(self.path(WORK), recursive=True)
        self.manifest = m
        return m

    def __exit__(self, exc_type, exc, tb) -> bool:
        if self.cached:
            return False
        try:
            if exc_type is None:
                self.commit()
        finally:
            self._release()
        return False
