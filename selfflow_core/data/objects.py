"""Latent stores in S3-compatible object storage: ``s3://bucket/path.zarr``.

A URL becomes zarr's own :class:`zarr.storage.ObjectStore` over obstore's ``S3Store``
(:class:`S3ZarrStore`); everything above it (the writer, the reader, the checks, the loader)
is the same code as for a local store. Why obstore and not s3fs: ``docs/store.md``, "Stores in
object storage" (measured in ``benchmarks/RESULTS.md``, "Loader").

Credentials come only from the environment (``AWS_ACCESS_KEY_ID``, ``AWS_SECRET_ACCESS_KEY``,
``AWS_SESSION_TOKEN``, ``AWS_ENDPOINT_URL_S3`` / ``AWS_ENDPOINT_URL``, ``AWS_REGION``,
``AWS_PROFILE``) or the usual AWS files (``~/.aws/credentials``, ``~/.aws/config``); they are
handed to the client in memory and written nowhere: a store pickles as its URL, the schema and
every message name the URL only, and a URL holding credentials is refused.

One writer per store: :class:`ObjectLock`, the object ``<path>.lock`` beside the store, created
with a conditional write (``If-None-Match: *``), so two writers on any hosts cannot both hold it
on a server that honours conditional writes (AWS S3, MinIO, Cloudflare R2, Ceph RGW, ...).
"""

from __future__ import annotations

import configparser
import datetime
import itertools
import os
import re
import socket
import uuid
import warnings
from collections.abc import AsyncIterator, Callable
from datetime import timedelta
from pathlib import Path
from typing import Any

import attrs
from zarr.storage import ObjectStore

from selfflow_core.errors import LockHeld, ObjectStoreError

__all__ = ["ObjectLock", "S3ZarrStore", "is_object_url", "settings", "split_url"]

SCHEME = "s3://"
#: how often a failed request (no connection, a dropped one, a 5xx answer) is retried, and how
#: long the retries of one request may take in all, before the error is raised
MAX_RETRIES = 10
RETRY_TIMEOUT_S = 120.0
CONNECT_TIMEOUT_S = 10.0
#: the region used when neither the environment nor ~/.aws/config names one
DEFAULT_REGION = "us-east-1"
_CODE = re.compile(r"<Code>([^<]{1,64})</Code>")
_RETRIES = re.compile(r"after (\d+) retries")


def is_object_url(path: Any) -> bool:
    """Whether ``path`` is an ``s3://`` URL (a store in object storage)."""
    return isinstance(path, str) and path.startswith(SCHEME)


def split_url(url: str) -> tuple[str, str]:
    """``s3://bucket/path/to.zarr`` -> ``("bucket", "path/to.zarr")``; refuses a URL without
    a path in the bucket and one holding credentials (they belong in the environment)."""
    netloc, _, key = url[len(SCHEME):].partition("/")
    if "@" in netloc or ":" in netloc:
        shown = f"{SCHEME}...@{netloc.rpartition('@')[2].split(':')[0]}/{key}"
        raise ObjectStoreError(shown, "credentials or a port in the URL are refused: give them "
                               "in the environment (AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, "
                               "AWS_ENDPOINT_URL) or ~/.aws, never in a path that configs and "
                               "logs keep")
    key = key.strip("/")
    if not netloc or not key:
        raise ObjectStoreError(url, "give the store's path in its bucket: s3://BUCKET/PATH.zarr")
    return netloc, key


@attrs.frozen(repr=False)
class Settings:
    """Where requests go and with which credentials (never shown: ``repr`` names the source)."""

    endpoint: str | None
    region: str
    source: str  # where the credentials came from, in words
    credentials: dict[str, str] = attrs.field(factory=dict)

    def __repr__(self) -> str:
        return f"Settings(endpoint={self.endpoint!r}, region={self.region!r}, {self.source})"

    @property
    def where(self) -> str:
        return self.endpoint or f"AWS S3 ({self.region})"

    def scrub(self, text: str) -> str:
        """``text`` with every credential value replaced by ``***``."""
        for value in self.credentials.values():
            if value and len(value) >= 4:
                text = text.replace(value, "***")
        return text


def _aws_files(profile: str) -> tuple[dict[str, str], str | None]:
    """The profile's keys from ``~/.aws/config`` then ``~/.aws/credentials`` (which wins, as
    for the AWS tools; ``AWS_CONFIG_FILE`` / ``AWS_SHARED_CREDENTIALS_FILE`` move them), and
    the file the credentials are in."""
    out: dict[str, str] = {}
    found = None
    config_section = "default" if profile == "default" else f"profile {profile}"
    for var, default, section in (("AWS_CONFIG_FILE", "~/.aws/config", config_section),
                                  ("AWS_SHARED_CREDENTIALS_FILE", "~/.aws/credentials", profile)):
        file = Path(os.environ.get(var) or default).expanduser()
        parser = configparser.RawConfigParser()
        try:
            parser.read(file)
        except (OSError, configparser.Error) as e:  # its text may quote a line: a secret
            raise ObjectStoreError(str(file), f"cannot read it ({type(e).__name__})") from None
        if parser.has_section(section):
            items = {k.lower(): v.strip() for k, v in parser.items(section)}
            if "aws_access_key_id" in items:
                found = str(file)
            out.update(items)
    return out, found


def settings() -> Settings:
    """The endpoint, region and credentials, read now: the environment first, then the
    ``AWS_PROFILE`` (else ``default``) profile of the AWS files. Without static credentials
    anywhere, obstore's own chain is used (web identity, container or instance credentials)."""
    env = os.environ
    profile = env.get("AWS_PROFILE") or env.get("AWS_DEFAULT_PROFILE") or "default"
    files, file = _aws_files(profile)
    credentials: dict[str, str] = {}
    if env.get("AWS_ACCESS_KEY_ID"):
        source = "AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY"
        keys = {"access_key_id": env["AWS_ACCESS_KEY_ID"],
                "secret_access_key": env.get("AWS_SECRET_ACCESS_KEY", ""),
                "session_token": env.get("AWS_SESSION_TOKEN", "")}
    elif files.get("aws_access_key_id"):
        source = f"profile {profile!r} of {file}"
        keys = {"access_key_id": files["aws_access_key_id"],
                "secret_access_key": files.get("aws_secret_access_key", ""),
                "session_token": files.get("aws_session_token", "")}
    else:
        source = "no static credentials (environment or ~/.aws): obstore's default chain"
        keys = {}
    credentials = {k: v for k, v in keys.items() if v}
    endpoint = (env.get("AWS_ENDPOINT_URL_S3") or env.get("AWS_ENDPOINT_URL")
                or files.get("endpoint_url") or None)
    region = (env.get("AWS_REGION") or env.get("AWS_DEFAULT_REGION") or files.get("region")
              or DEFAULT_REGION)
    return Settings(endpoint=endpoint, region=region, source=source, credentials=credentials)


def _s3(bucket: str, prefix: str | None, s: Settings) -> Any:
    """obstore's ``S3Store`` for ``bucket`` (under ``prefix``) with these settings."""
    try:
        from obstore.store import S3Store
    except ImportError:
        raise ObjectStoreError(f"{SCHEME}{bucket}/{prefix or ''}", "s3:// stores need obstore: "
                               "pip install 'selfflow[s3]' (or obstore)") from None
    config: dict[str, Any] = {"region": s.region, **s.credentials}
    if s.endpoint:
        config["endpoint"] = s.endpoint
    return S3Store(
        bucket, prefix=prefix, config=config,
        client_options={"allow_http": bool(s.endpoint and s.endpoint.startswith("http://")),
                        "connect_timeout": timedelta(seconds=CONNECT_TIMEOUT_S)},
        retry_config={"max_retries": MAX_RETRIES,
                      "retry_timeout": timedelta(seconds=RETRY_TIMEOUT_S)})


def problem(exc: BaseException, url: str, s: Settings) -> str:
    """What went wrong with a request, in one line without any credential."""
    text = str(exc)
    match = _CODE.search(text)
    code = match.group(1) if match else None
    bucket = split_url(url)[0]
    if code == "NoSuchBucket":
        return f"the bucket {bucket!r} does not exist at {s.where}"
    if code == "InvalidAccessKeyId":
        return (f"{s.where} does not know the access key id (credentials from {s.source}); "
                "check them")
    if code == "SignatureDoesNotMatch":
        return (f"{s.where} refused the credentials: the secret access key does not match the "
                f"access key id (credentials from {s.source})")
    if code in ("ExpiredToken", "TokenRefreshRequired", "InvalidToken", "RequestExpired"):
        return (f"{s.where} refused the credentials: the session token is invalid or expired "
                f"({code}; credentials from {s.source})")
    if code in ("AccessDenied", "AllAccessDisabled") or type(exc).__name__ in (
            "PermissionDeniedError", "UnauthenticatedError"):
        return (f"access to the bucket {bucket!r} was denied for these credentials "
                f"({code or type(exc).__name__}; credentials from {s.source})")
    if "HTTP error" in text or "error sending request" in text or "connection" in text.lower():
        tries = _RETRIES.search(text)
        retried = f", after {tries.group(1)} retries" if tries else ""
        return (f"cannot reach {s.where}: the connection failed or was dropped{retried} (an "
                "encode stopped by it resumes from its last commit when run again)")
    if code:
        return f"{s.where} answered {code} ({type(exc).__name__})"
    first = s.scrub(text.split("\n", 1)[0])[:300]
    return f"{type(exc).__name__}: {first}"


def _obstore_errors() -> type[Exception]:
    import obstore.exceptions
    return obstore.exceptions.BaseError


class S3ZarrStore(ObjectStore):
    """zarr's :class:`~zarr.storage.ObjectStore` over obstore's ``S3Store`` for one
    ``s3://bucket/path`` URL: a failed request is an :class:`ObjectStoreError` naming the URL
    (never a credential); it pickles as its URL, the credentials read again where it is
    unpickled."""

    def __init__(self, url: str, *, read_only: bool = False, _settings: Settings | None = None,
                 _store: Any = None) -> None:
        self.url = url.rstrip("/")
        self.bucket, self.key = split_url(self.url)
        self.settings = _settings or settings()
        super().__init__(_store if _store is not None
                         else _s3(self.bucket, self.key, self.settings), read_only=read_only)

    def with_read_only(self, read_only: bool = False) -> S3ZarrStore:
        return type(self)(self.url, read_only=read_only, _settings=self.settings,
                          _store=self.store)

    def __eq__(self, other: object) -> bool:
        return (isinstance(other, S3ZarrStore) and other.url == self.url
                and other.read_only == self.read_only)

    __hash__ = None  # type: ignore[assignment]

    def __str__(self) -> str:
        return self.url

    def __repr__(self) -> str:
        return f"S3ZarrStore({self.url!r})"

    def __getstate__(self) -> dict[str, Any]:
        return {"url": self.url, "read_only": self.read_only}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(state["url"], read_only=state["read_only"])

    def error(self, exc: BaseException) -> ObjectStoreError:
        return ObjectStoreError(self.url, problem(exc, self.url, self.settings))

    def probe(self) -> bool:
        """Whether anything is stored under the URL (one list request); an
        :class:`ObjectStoreError` for a missing bucket, refused credentials or an endpoint that
        cannot be reached, before zarr would take any of them for an empty store."""
        import obstore as obs
        try:
            return any(len(c) for c in itertools.islice(obs.list(self.store, chunk_size=1), 1))
        except (_obstore_errors(), FileNotFoundError) as e:
            raise self.error(e) from None

    async def _call(self, method: Callable, *args: Any) -> Any:
        try:
            return await method(*args)
        except FileNotFoundError as e:
            if "NoSuchBucket" in str(e):
                raise self.error(e) from None
            raise  # zarr's own meaning (a missing key), as for any store
        except _obstore_errors() as e:
            raise self.error(e) from None

    async def _each(self, items: AsyncIterator[str]) -> AsyncIterator[str]:
        try:
            async for item in items:
                yield item
        except _obstore_errors() as e:
            raise self.error(e) from None

    async def get(self, key, prototype, byte_range=None):
        return await self._call(super().get, key, prototype, byte_range)

    async def get_partial_values(self, prototype, key_ranges):
        return await self._call(super().get_partial_values, prototype, key_ranges)

    async def exists(self, key):
        return await self._call(super().exists, key)

    async def set(self, key, value):
        return await self._call(super().set, key, value)

    async def set_if_not_exists(self, key, value):
        return await self._call(super().set_if_not_exists, key, value)

    async def delete(self, key):
        return await self._call(super().delete, key)

    async def delete_dir(self, prefix):
        return await self._call(super().delete_dir, prefix)

    async def getsize(self, key):
        return await self._call(super().getsize, key)

    async def getsize_prefix(self, prefix):
        return await self._call(super().getsize_prefix, prefix)

    def list(self):
        return self._each(super().list())

    def list_prefix(self, prefix):
        return self._each(super().list_prefix(prefix))

    def list_dir(self, prefix):
        return self._each(super().list_dir(prefix))


class ObjectLock:
    """One writer per store in object storage: the object ``<url>.lock``, holding
    ``pid host time token``, written only if absent (``If-None-Match: *``). A second writer is
    :class:`LockHeld` naming the holder; a lock left by a dead process of this host is taken
    over, one from another host is assumed alive (delete it by hand if no writer runs there).
    The lock is read back after writing it, so a server that ignores conditional writes is
    still caught when a second writer overwrote it."""

    #: the locks this process holds (one of this process not among them was left by a writer
    #: of it that could not remove it: it is taken over)
    _held: set[str] = set()

    def __init__(self, url: str) -> None:
        self.url = url.rstrip("/")
        bucket, key = split_url(self.url)
        self.file, self.key = f"{self.url}.lock", f"{key}.lock"
        self.settings = settings()
        self.store = _s3(bucket, None, self.settings)
        self.body = (f"{os.getpid()} {socket.gethostname()} "
                     f"{datetime.datetime.now(datetime.UTC).isoformat(timespec='seconds')} "
                     f"{uuid.uuid4().hex}\n").encode()

    def _error(self, exc: BaseException) -> ObjectStoreError:
        return ObjectStoreError(self.url, problem(exc, self.url, self.settings))

    def _read(self) -> bytes | None:
        import obstore as obs
        try:
            return bytes(obs.get(self.store, self.key).bytes())
        except FileNotFoundError:
            return None

    def holder(self) -> tuple[int, str] | None:
        import obstore.exceptions as obx
        try:
            pid, host = (self._read() or b"").decode().split()[:2]
            return int(pid), host
        except (ValueError, UnicodeDecodeError, obx.BaseError):
            return None

    def acquire(self) -> ObjectLock:
        import obstore as obs
        from obstore.exceptions import AlreadyExistsError, BaseError, PreconditionError

        from selfflow_core.runtime.locking import _alive
        try:
            for attempt in range(2):
                try:
                    obs.put(self.store, self.key, self.body, mode="create")
                except (AlreadyExistsError, PreconditionError):
                    holder = self.holder()
                    mine = holder == (os.getpid(), socket.gethostname())
                    if attempt == 0 and holder is not None and (
                            not _alive(*holder) or mine and self.file not in self._held):
                        obs.delete(self.store, self.key)  # stale: its process is gone
                        continue
                    raise LockHeld(self.file, holder) from None
                if self._read() != self.body:  # overwritten: the server ignored If-None-Match
                    raise LockHeld(self.file, self.holder())
                self._held.add(self.file)
                return self
        except (BaseError, FileNotFoundError) as e:  # FileNotFoundError: no such bucket
            raise self._error(e) from None
        raise AssertionError("unreachable")

    def release(self) -> None:
        """Delete the lock if it is still this writer's; when the store cannot be reached, it
        is left (the next writer on this host takes it over) with a warning."""
        import obstore as obs
        from obstore.exceptions import BaseError
        self._held.discard(self.file)
        try:
            if self._read() == self.body:
                obs.delete(self.store, self.key)
        except (BaseError, FileNotFoundError) as e:
            why = problem(e, self.url, self.settings)
            warnings.warn(f"the lock {self.file} was not removed ({why})", stacklevel=2)
