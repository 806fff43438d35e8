"""Stores in S3-compatible object storage (``s3://bucket/path.zarr``), end to end, against a real
S3 server started here on 127.0.0.1 (moto's, with IAM authentication on, so that wrong
credentials are refused as a cloud would): write and read back, an interrupted encode resumed,
the loader, ``selfflow store check``, the single-writer lock, a training run on an s3:// store,
and the failures a user meets (no such bucket, wrong credentials, a dropped connection), each
one clear line without any secret in it."""

from __future__ import annotations

import json
import logging
import pickle
import socket
import threading
import uuid
from types import SimpleNamespace

import attrs
import numpy as np
import pytest

pytest.importorskip("obstore")
moto_server = pytest.importorskip("moto.server")

import selfflow_core.cli.main as cli  # noqa: E402
from selfflow_core.builtin.toy import ToyModality  # noqa: E402
from selfflow_core.data import objects  # noqa: E402
from selfflow_core.data.blocks import ShuffleConfig  # noqa: E402
from selfflow_core.data.check import zarr_target  # noqa: E402
from selfflow_core.data.loader import LoaderSource, build_loader  # noqa: E402
from selfflow_core.data.store import StoreError, check_store, open_store, store_schema  # noqa: E402
from selfflow_core.data.writer import StoreWriter, encode_store  # noqa: E402
from selfflow_core.errors import ObjectStoreError  # noqa: E402

COUNT, BATCH = 300, 64
TOY = ToyModality.Config(tokens=8, channels=4, classes=4, count=COUNT)
BUCKET = "selfflow-test"
pytestmark = pytest.mark.usefixtures("one_thread")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def s3_server():
    """moto's S3 server on a free port of 127.0.0.1, with authentication on: one IAM user
    allowed everything, its access key, and the bucket :data:`BUCKET`."""
    import boto3
    from moto import settings
    from moto.core.authorization import ActionAuthenticatorMixin

    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # no line per request
    server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=free_port(),
                                            verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    endpoint = f"http://{host}:{port}"
    setup = {"endpoint_url": endpoint, "region_name": "us-east-1",
             "aws_access_key_id": "setup", "aws_secret_access_key": "setup"}
    iam = boto3.client("iam", **setup)
    iam.create_user(UserName="trainer")
    iam.put_user_policy(UserName="trainer", PolicyName="all", PolicyDocument=json.dumps(
        {"Version": "2012-10-17",
         "Statement": [{"Effect": "Allow", "Action": "*", "Resource": "*"}]}))
    key = iam.create_access_key(UserName="trainer")["AccessKey"]
    boto3.client("s3", **setup).create_bucket(Bucket=BUCKET)
    before = settings.INITIAL_NO_AUTH_ACTION_COUNT, ActionAuthenticatorMixin.request_count
    settings.INITIAL_NO_AUTH_ACTION_COUNT, ActionAuthenticatorMixin.request_count = 0, 0
    try:
        yield SimpleNamespace(endpoint=endpoint, port=port, key=key["AccessKeyId"],
                              secret=key["SecretAccessKey"])
    finally:
        settings.INITIAL_NO_AUTH_ACTION_COUNT, ActionAuthenticatorMixin.request_count = before
        server.stop()


def set_env(monkeypatch, tmp_path, endpoint: str, key: str, secret: str) -> None:
    """The credentials and endpoint, in the environment only; this machine's ~/.aws unused."""
    for var in ("AWS_PROFILE", "AWS_DEFAULT_PROFILE", "AWS_SESSION_TOKEN", "AWS_ENDPOINT_URL_S3",
                "AWS_DEFAULT_REGION"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "no-aws-config"))
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "no-aws-credentials"))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", key)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", secret)
    monkeypatch.setenv("AWS_ENDPOINT_URL", endpoint)
    monkeypatch.setenv("AWS_REGION", "us-east-1")


@pytest.fixture
def s3(s3_server, monkeypatch, tmp_path):
    """The server, its credentials in the environment, and a fresh store URL for this test."""
    set_env(monkeypatch, tmp_path, s3_server.endpoint, s3_server.key, s3_server.secret)
    monkeypatch.setenv("SELFFLOW_DISABLE_PLUGIN_AUTOLOAD", "1")
    return SimpleNamespace(**vars(s3_server), url=f"s3://{BUCKET}/{uuid.uuid4().hex}/toy.zarr")


@pytest.fixture(scope="module")
def local(tmp_path_factory):
    """The same data in a local store, encoded once without interruption."""
    path = tmp_path_factory.mktemp("local") / "toy.zarr"
    encode(path)
    return str(path)


def encode(path, adapter=None, **kw):
    return encode_store(adapter or TOY.build(), "waves", path, adapter_config=attrs.asdict(TOY),
                        batch_size=BATCH, progress=False, **kw)


def everything(path, **kw) -> dict[str, np.ndarray]:
    store = open_store(path, **kw)
    return store.read(np.arange(len(store)))


def assert_same(a: dict, b: dict) -> None:
    assert sorted(a) == sorted(b)
    for k in a:
        np.testing.assert_array_equal(a[k], b[k], err_msg=k)


def bucket_objects(s3) -> dict[str, bytes]:
    """Every object under this test's prefix, read straight from the server."""
    import obstore as obs
    prefix = s3.url[len(f"s3://{BUCKET}/"):].rsplit("/", 1)[0]
    store = objects._s3(BUCKET, None, objects.settings())
    keys = [m["path"] for chunk in obs.list(store, prefix=prefix) for m in chunk]
    return {k: bytes(obs.get(store, k).bytes()) for k in keys}


class Toy(ToyModality):
    """The toy modality with a hook run at its encoder's ``at``-th call."""

    def __init__(self, config, at: int, hook) -> None:
        super().__init__(config)
        self.calls, self.at, self.hook = 0, at, hook

    def encode(self, raw):
        self.calls += 1
        if self.calls == self.at:
            self.hook()
        return raw


def fail() -> None:
    raise RuntimeError("encoder crashed")


# ---------------------------------------------------------------- write, read, resume

def test_written_store_reads_back_equal_to_a_local_one(s3, local):
    store = encode(s3.url)
    assert store.path == s3.url and len(store) == COUNT
    assert_same(everything(s3.url), everything(local))
    assert_same(everything(s3.url, cache_bytes=0), everything(local))  # zarr reads, uncached
    local_schema = {k: v for k, v in open_store(local).schema.items() if k != "created_at"}
    assert {k: v for k, v in store.schema.items() if k != "created_at"} == local_schema
    assert check_store(s3.url) == []
    assert encode(s3.url).verified  # complete: read and returned as is
    stored = bucket_objects(s3)
    assert f"{s3.url[len(f's3://{BUCKET}/'):]}/zarr.json" in stored
    assert not any(k.endswith(".lock") for k in stored)  # the writer's lock is gone
    for secret in (s3.secret, s3.key):  # credentials never reach the store
        assert not any(secret.encode() in v for v in stored.values())
    zstore = zarr_target(s3.url)  # nor a pickle of it (one sent to a worker process)
    pickled = pickle.dumps(zstore)
    assert s3.secret.encode() not in pickled and pickle.loads(pickled) == zstore


def test_interrupted_encode_resumes_to_the_same_data(s3, local):
    with pytest.raises(RuntimeError, match="encoder crashed"):
        encode(s3.url, Toy(TOY, at=3, hook=fail))
    with pytest.raises(StoreError, match="incomplete: 128 samples committed"):
        open_store(s3.url)  # nothing half-written is reported as complete
    assert len(open_store(s3.url, require_complete=False)) == 2 * BATCH
    assert "incomplete" in " ".join(check_store(s3.url))
    store = encode(s3.url)
    assert len(store) == COUNT
    assert_same(everything(s3.url), everything(local))


def test_loader_batches_equal_the_local_stores(s3, local):
    encode(s3.url)
    adapter = TOY.build()
    for shuffle in (None, ShuffleConfig(kind="block", window_blocks=2)):
        batches = []
        for path in (s3.url, local):
            store = open_store(path, cache_bytes=0)  # every batch read from the store
            loader = build_loader([LoaderSource(store=store, tokenize=adapter.tokenize,
                                                batch_size=32)],
                                  seed=3, num_workers=2, prefetch=2, shuffle=shuffle)
            it = iter(loader)
            batches.append([next(it)[1] for _ in range(4)])
        for a, b in zip(*batches):
            assert a.tokens.equal(b.tokens) and a.labels.equal(b.labels)


def test_a_sharded_store_in_object_storage(s3, tmp_path, local):
    """Written in shards of 32 samples (4 chunks of 8): read back equal (cached, uncached, the
    block shuffle through zarr), a sampled check, and a missing shard named by its URL."""
    sharded = str(tmp_path / "sharded.zarr")
    store = encode(s3.url, chunks=8, shards=32)
    encode(sharded, chunks=8, shards=32)
    assert store.schema["shards"] == {"latents": 32, "labels": 32}
    assert_same(everything(s3.url), everything(local))
    assert_same(everything(s3.url, cache_bytes=0), everything(local))
    adapter = TOY.build()
    batches = []
    for path in (s3.url, sharded):
        loader = build_loader([LoaderSource(store=open_store(path, cache_bytes=0),
                                            tokenize=adapter.tokenize, batch_size=32)],
                              seed=3, shuffle=ShuffleConfig(kind="block", window_blocks=2))
        it = iter(loader)
        batches.append([next(it)[1] for _ in range(4)])
    for a, b in zip(*batches):
        assert a.tokens.equal(b.tokens) and a.labels.equal(b.labels)
    assert check_store(s3.url) == [] and check_store(s3.url, fraction=0.3) == []
    import obstore as obs
    key = f"{s3.url[len(f's3://{BUCKET}/'):]}/latents/c/3/0/0"
    obs.delete(objects._s3(BUCKET, None, objects.settings()), key)
    assert check_store(s3.url, fraction=0.3) == [
        f"field 'latents': shard 3 (chunks 12..15, samples 96..127) is missing (it would read "
        f"as fill values): shard file s3://{BUCKET}/{key}"]


def test_encode_and_store_check_commands(s3, capsys, local):
    options = [f"{k}={v}" for k, v in attrs.asdict(TOY).items()]
    assert cli.main(["encode", "toy", "waves", s3.url, *options, "--batch-size", "64"]) == 0
    assert_same(everything(s3.url), everything(local))
    assert cli.main(["store", "check", s3.url]) == 0
    out = capsys.readouterr().out
    assert f"store {s3.url}: ok" in out and "samples: 300, complete" in out


def test_one_writer_at_a_time(s3):
    schema = store_schema(TOY.build(), source="waves", source_description="",
                          adapter_config=attrs.asdict(TOY))
    with StoreWriter(s3.url, schema):
        with pytest.raises(StoreError, match=rf"another writer holds the lock {s3.url}\.lock "
                                             rf"\(pid \d+ on host "):
            StoreWriter(s3.url, schema)
    with StoreWriter(s3.url, schema):  # released: the next writer gets it
        pass
    # a lock left by a process of this host that is gone is taken over
    lock = objects.ObjectLock(s3.url)
    import obstore as obs
    obs.put(lock.store, lock.key, f"999999999 {socket.gethostname()} then token\n".encode())
    with StoreWriter(s3.url, schema):
        pass
    # one of another host is assumed alive
    obs.put(lock.store, lock.key, b"4242 another-host then token\n")
    with pytest.raises(StoreError, match="pid 4242 on host another-host"):
        StoreWriter(s3.url, schema)


def test_training_run_on_an_s3_store(s3, tmp_path, local):
    """A run whose ModalitySpec.store is an s3:// URL encodes its store there, then trains."""
    from selfflow_core.builtin.dit import DiT
    from selfflow_core.builtin.presets import toy
    from selfflow_core.builtin.trackers import NullTracker
    from selfflow_core.config.run import CheckpointConfig
    from selfflow_core.plugins.manager import Components, make_plugin_manager
    from selfflow_core.trainer import Trainer

    base = toy()
    spec = attrs.evolve(base.modalities["toy"], modality=TOY, store=s3.url, source="waves",
                        batch_size=8)
    cfg = attrs.evolve(base, modalities={"toy": spec},
                       backbone=DiT.Config(depth=3, width=32, heads=4),
                       checkpoint=CheckpointConfig(every=2, keep=1),
                       sampling=attrs.evolve(base.sampling, count=4, steps=2),
                       tracker=NullTracker.Config(), steps=2, run_dir=str(tmp_path / "run"),
                       log_every=1)
    trainer = Trainer(cfg, components=Components(make_plugin_manager(entry_points=False)),
                      progress=False)
    trainer.fit()
    assert trainer.step == 2 and all(np.isfinite(trainer.losses))
    assert_same(everything(s3.url), everything(local))


# ---------------------------------------------------------------- what a user gets wrong

def one_line(error: BaseException) -> str:
    text = str(error)
    assert "\n" not in text, text
    return text


def test_missing_bucket_is_one_line_naming_it(s3, capsys):
    url = "s3://no-such-bucket-here/toy.zarr"
    with pytest.raises(ObjectStoreError) as e:
        open_store(url)
    assert "bucket 'no-such-bucket-here' does not exist" in one_line(e.value)
    with pytest.raises(ObjectStoreError, match="bucket 'no-such-bucket-here' does not exist"):
        encode(url)
    assert cli.main(["store", "check", url]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: object store s3://no-such-bucket-here/toy.zarr: ")
    assert "\n" not in err


def test_a_store_that_is_not_there(s3):
    with pytest.raises(StoreError, match="no such store"):
        open_store(s3.url)


@pytest.mark.parametrize("wrong", ["secret", "key"])
def test_wrong_credentials_are_clear_and_keep_the_secret(s3, monkeypatch, tmp_path, wrong):
    encode(s3.url)
    secret = "wrong-secret-" + uuid.uuid4().hex
    key = s3.key if wrong == "secret" else "AKIA" + uuid.uuid4().hex[:16].upper()
    set_env(monkeypatch, tmp_path, s3.endpoint, key, secret)
    expected = ("secret access key does not match" if wrong == "secret"
                else "does not know the access key id")
    for attempt in (lambda: open_store(s3.url), lambda: encode(s3.url),
                    lambda: check_store(s3.url)):
        with pytest.raises(ObjectStoreError) as e:
            attempt()
        text = one_line(e.value)
        assert expected in text and "AWS_ACCESS_KEY_ID" in text
        assert secret not in text and s3.secret not in text
        assert secret not in repr(e.value.__reduce__())


def test_credentials_in_the_url_are_refused(s3):
    with pytest.raises(ObjectStoreError, match="credentials or a port in the URL") as e:
        open_store(f"s3://AKIAX:{s3.secret}@{BUCKET}/toy.zarr")
    assert s3.secret not in str(e.value)


def test_credentials_from_the_aws_files(s3, monkeypatch, tmp_path, local):
    (tmp_path / "credentials").write_text(
        f"[training]\naws_access_key_id = {s3.key}\naws_secret_access_key = {s3.secret}\n")
    (tmp_path / "config").write_text(
        f"[profile training]\nregion = us-east-1\nendpoint_url = {s3.endpoint}\n")
    for var in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_ENDPOINT_URL", "AWS_REGION"):
        monkeypatch.delenv(var)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "credentials"))
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "config"))
    monkeypatch.setenv("AWS_PROFILE", "training")
    encode(s3.url)
    assert_same(everything(s3.url), everything(local))
    assert s3.secret not in repr(objects.settings())


class Proxy:
    """A TCP forwarder from a port of 127.0.0.1 to the server; :meth:`drop` closes it and every
    connection through it (requests then find the port closed)."""

    def __init__(self, port: int) -> None:
        self.port_to, self.sockets = port, []
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            server = socket.create_connection(("127.0.0.1", self.port_to))
            self.sockets += [client, server]
            for a, b in ((client, server), (server, client)):
                threading.Thread(target=self._pump, args=(a, b), daemon=True).start()

    @staticmethod
    def _pump(a: socket.socket, b: socket.socket) -> None:
        try:
            while data := a.recv(65536):
                b.sendall(data)
        except OSError:
            pass
        for s in (a, b):
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    def drop(self) -> None:
        for s in (self.listener, *self.sockets):
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            s.close()


def test_dropped_connection_mid_encode(s3, monkeypatch, tmp_path, local):
    monkeypatch.setattr(objects, "MAX_RETRIES", 2)
    monkeypatch.setattr(objects, "RETRY_TIMEOUT_S", 2.0)
    proxy = Proxy(s3.port)
    set_env(monkeypatch, tmp_path, f"http://127.0.0.1:{proxy.port}", s3.key, s3.secret)
    with pytest.raises(ObjectStoreError) as e, pytest.warns(UserWarning, match="not removed"):
        encode(s3.url, Toy(TOY, at=3, hook=proxy.drop))
    text = one_line(e.value)
    assert f"cannot reach http://127.0.0.1:{proxy.port}" in text and "dropped" in text
    assert s3.secret not in text
    set_env(monkeypatch, tmp_path, s3.endpoint, s3.key, s3.secret)  # the server, directly
    with pytest.raises(StoreError, match="incomplete"):
        open_store(s3.url)  # not reported complete
    assert "incomplete" in " ".join(check_store(s3.url))
    assert len(open_store(s3.url, require_complete=False)) == 2 * BATCH
    encode(s3.url)  # resumes (the lock the dropped writer left is taken over)
    assert_same(everything(s3.url), everything(local))
