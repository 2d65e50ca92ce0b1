"""Backups proven by restores, against a private, real environment (PostgreSQL 15 and Redis 7).

Backup, destroy, restore: identical data. Kill -9 during a backup: never listed, swept next time. One
flipped byte: verify names the file. A wrong key: a clear error, nothing changed. Physical backups and
the restore drill; S3-compatible storage (moto's server, an HTTP fake of S3) for the storage class.
"""

from __future__ import annotations

import io
import json
import os
import re
import secrets
import signal
import subprocess
import sys
import tarfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psutil
import pytest

from opskit import audit, backup, backup_crypto, backup_storage, basebackup, localenv, model, pgtools
from opskit.errors import BadInput, OperationFailed
from tests.conftest import ROOT, free_ports, new_environment

pytestmark = pytest.mark.timeout(300)


@pytest.fixture(scope="module")
def env(environments_dir: Path) -> Iterator[model.Environment]:
    environment = new_environment(environments_dir)
    localenv.up(environment)
    _seed(environment)
    yield environment
    localenv.down(environment, purge=True)


def _seed(env: model.Environment) -> None:
    with pgtools.connect(env, localenv.database_name(env)) as conn:
        conn.execute(
            """
            CREATE SCHEMA IF NOT EXISTS governance;
            CREATE TABLE governance.decisions (id bigint PRIMARY KEY, patch text NOT NULL, approved boolean,
                reason text, decided_at timestamptz, details jsonb, score numeric(6, 3));
            INSERT INTO governance.decisions
                SELECT g, 'patch-' || g, g % 3 = 0, CASE WHEN g % 7 = 0 THEN NULL ELSE md5(g::text) END,
                       timestamptz '2026-01-01' + g * interval '1 minute',
                       jsonb_build_object('g', g, 'k', 'v'),
                       (g % 1000) / 7.0
                  FROM generate_series(1, 20000) AS g;
            CREATE TABLE events (id serial PRIMARY KEY, body bytea, tags text[]);
            INSERT INTO events (body, tags)
                SELECT decode(md5(g::text), 'hex'), ARRAY['a', g::text] FROM generate_series(1, 5000) AS g;
            CREATE TABLE empty_table (id int);
            CREATE TYPE mood AS ENUM ('sad', 'ok', 'glad');
            CREATE TABLE moods (id int, feeling mood);
            INSERT INTO moods
                SELECT g, (ARRAY['sad', 'ok'])[g % 2 + 1]::mood FROM generate_series(1, 300) AS g;
            CREATE TABLE odd_types (id int, doc json, at point);
            INSERT INTO odd_types
                SELECT g, json_build_object('g', g), point(g, -g) FROM generate_series(1, 300) AS g;
            """
        )
    live = pgtools.live_redis(env)
    live.set("cache:plain", "value")
    live.set("cache:ttl", "expires", ex=3600)
    live.hset("patch:1", mapping={"state": "pending", "score": "0.93"})
    live.rpush("queue", "a", "b", "c")
    live.sadd("set", "x", "y")
    live.zadd("ranking", {"m": 1.5, "n": 2.5})
    live.set("bin", bytes(range(256)))
    other = pgtools.live_redis(env, 2)
    other.set("db2:key", "two", px=7_200_000)
    other.close()
    live.close()


def _redis_snapshot(env: model.Environment) -> dict[tuple[int, bytes], tuple[bytes, int]]:
    """(db, key) -> (type and value with members in a canonical order, PTTL)."""
    found = {}
    for db in (0, 1, 2):
        client = pgtools.live_redis(env, db)
        for key in client.scan_iter():
            found[(db, bytes(key))] = (pgtools.redis_value(client, key) or b"", int(client.pttl(key)))
        client.close()
    return found


def _live_checksums(env: model.Environment) -> dict[str, Any]:
    with pgtools.connect(env, localenv.database_name(env)) as conn:
        return pgtools.table_checksums(conn)


def _databases(env: model.Environment) -> list[str]:
    with pgtools.connect(env, "postgres") as conn:
        return sorted(r[0] for r in conn.execute("SELECT datname FROM pg_database").fetchall())


def test_backup_destroy_restore_gives_identical_data(env: model.Environment) -> None:
    tables, keys = _live_checksums(env), _redis_snapshot(env)
    assert tables["governance.decisions"]["rows"] == 20000
    # hashed by value where every column type can be; by text where one cannot (json, point) or where a
    # value's hash would depend on the database (an enum's)
    assert tables["governance.decisions"]["method"] == tables["public.events"]["method"] == "record"
    assert tables["public.odd_types"]["method"] == tables["public.moods"]["method"] == "text"
    made = backup.backup(env)
    manifest = json.loads((env.state_path / "backups" / made.id / "manifest.json").read_text())
    assert manifest["postgres"]["tables"] == tables
    assert manifest["key_id"] == made.key_id == backup_crypto.load_key(env).id
    assert all(len(f["sha256"]) == 64 and f["size"] > 0 for f in manifest["files"].values())
    assert {"started_at", "finished_at", "duration_seconds", "versions"} <= set(manifest)
    assert backup.list_backups(env)[0]["id"] == made.id

    # into a new database (the default): identical, the live one untouched
    copy = backup.restore(env, made.id)
    assert copy.identical and not copy.replaced_live and copy.database != localenv.database_name(env)
    with pgtools.connect(env, copy.database) as conn:
        assert pgtools.table_checksums(conn) == tables
    with pgtools.connect(env, "postgres") as conn:
        pgtools.drop_database(conn, copy.database)

    # destroy, then restore over the live database
    with pgtools.connect(env, localenv.database_name(env)) as conn:
        conn.execute("DROP TABLE events; DELETE FROM governance.decisions WHERE id % 2 = 0")
        conn.execute("INSERT INTO empty_table VALUES (1)")
    pgtools.live_redis(env).flushall()
    pgtools.live_redis(env).set("intruder", "x")
    started = time.monotonic()
    replaced = backup.restore(env, made.id, force=True, confirmed=True)
    assert replaced.replaced_live and replaced.safety_backup in backup_storage.for_environment(env).ids()
    assert _live_checksums(env) == tables
    after = _redis_snapshot(env)
    assert set(after) == set(keys)
    for name, (value, ttl) in keys.items():
        assert after[name][0] == value, name
        if ttl < 0:
            assert after[name][1] == ttl, name
        else:
            elapsed_ms = (time.monotonic() - started) * 1000 + 60_000
            assert ttl - elapsed_ms <= after[name][1] <= ttl, name
    operations = [r["operation"] for r in audit.for_environment(env).records()]
    assert "db.restore" in operations and "db.backup" in operations


def test_parallel_checksums_cut_into_block_ranges_sum_to_one_scan(
    env: model.Environment, monkeypatch: pytest.MonkeyPatch
) -> None:
    whole = _live_checksums(env)
    monkeypatch.setattr(pgtools, "SPLIT_BLOCKS", 2)  # every table of two blocks and more is cut in parts
    parts = pgtools.table_checksums_parallel(lambda: pgtools.connect(env, localenv.database_name(env)), 3)
    assert parts == whole
    assert len(pgtools._block_ranges(100, 3)) == 3 and pgtools._block_ranges(100, 3)[-1][1] is None


def test_bad_input_changes_nothing(env: model.Environment) -> None:
    made = backup.backup_and_verify(env)
    before = _databases(env), backup_storage.for_environment(env).ids()
    live = localenv.database_name(env)
    cases: list[tuple[dict[str, Any], str]] = [
        ({"backup_id": "b-20200101T000000000000Z"}, "unknown backup"),
        ({"backup_id": "../../etc/passwd"}, "not a backup id"),
        ({"backup_id": made, "into": "../evil"}, "--into"),
        ({"backup_id": made, "into": "a/b"}, "--into"),
        ({"backup_id": made, "into": live}, "live database"),
        ({"backup_id": made, "force": True}, "confirmation"),
    ]
    for kwargs, message in cases:
        with pytest.raises(BadInput, match=message) as caught:
            backup.restore(env, **kwargs)
        assert caught.value.exit_code == 2
    with pytest.raises(BadInput, match="not a backup id"):
        backup.verify(env, "b-1/../x")
    assert (_databases(env), backup_storage.for_environment(env).ids()) == before


def test_wrong_key_is_a_clear_error(env: model.Environment, monkeypatch: pytest.MonkeyPatch) -> None:
    made = backup.backup_and_verify(env)
    monkeypatch.setenv(env.backup.encryption_key_env, secrets.token_hex(32))
    with pytest.raises(
        backup_crypto.WrongKey, match=r"encrypted with key id \w+, but the key from"
    ) as caught:
        backup.verify(env, made)
    assert caught.value.exit_code == 2
    before = _databases(env)
    with pytest.raises(backup_crypto.WrongKey):
        backup.restore(env, made)
    assert _databases(env) == before
    monkeypatch.setenv(env.backup.encryption_key_env, "not-a-key")
    with pytest.raises(BadInput, match="not a key"):
        backup.verify(env, made)


def test_one_flipped_byte_fails_verify_naming_the_file(env: model.Environment) -> None:
    made = backup.backup_and_verify(env)
    assert backup.verify(env, made).ok
    directory = env.state_path / "backups" / made
    victim = sorted((directory / "postgres").iterdir())[-1]
    data = bytearray(victim.read_bytes())
    data[len(data) // 2] ^= 0x01
    victim.write_bytes(bytes(data))
    report = backup.verify(env, made)
    assert not report.ok
    assert any(f"postgres/{victim.name}" in problem for problem in report.problems), report.problems
    with pytest.raises(OperationFailed, match=victim.name):
        backup.restore(env, made)

    # a table's data reach pg_restore through a pipe as they are decrypted: a changed chunk stops the
    # restore (no hang), names the file, and leaves no database behind
    data[len(data) // 2] ^= 0x01  # the first victim mended
    victim.write_bytes(bytes(data))
    assert backup.verify(env, made).ok
    table_data = max((directory / "postgres").glob("*.dat.*"), key=lambda p: p.stat().st_size)
    data = bytearray(table_data.read_bytes())
    data[len(data) // 2] ^= 0x01
    table_data.write_bytes(bytes(data))
    before = _databases(env)
    with pytest.raises(OperationFailed, match=table_data.name):
        backup.restore(env, made)
    assert _databases(env) == before


def test_kill_9_during_a_backup_is_never_listed(env: model.Environment, environments_dir: Path) -> None:
    with pgtools.connect(env, localenv.database_name(env)) as conn:
        conn.execute(
            "CREATE TABLE IF NOT EXISTS bulk AS SELECT g AS id, repeat(md5(g::text), 8) AS filler "
            "FROM generate_series(1, 400000) AS g"
        )
    listed = set(backup_storage.for_environment(env).ids())
    code = f"from opskit import backup, model; backup.backup(model.load_environment({env.name!r}))"
    proc = subprocess.Popen(
        [sys.executable, "-c", code],
        cwd=ROOT,
        env={**os.environ, model.EXTRA_ENVIRONMENTS_VAR: str(environments_dir)},
    )
    root = env.state_path / "backups"
    deadline = time.monotonic() + 60
    while not any((p / "plain-postgres").exists() for p in root.glob(".partial-*")):
        assert time.monotonic() < deadline and proc.poll() is None, "the backup never started dumping"
        time.sleep(0.01)
    children = psutil.Process(proc.pid).children(recursive=True)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    psutil.wait_procs(children, timeout=10)
    assert not any(c.is_running() and c.status() != psutil.STATUS_ZOMBIE for c in children), (
        "tools outlived it"
    )
    assert set(backup_storage.for_environment(env).ids()) == listed
    assert [r["id"] for r in backup.list_backups(env)] == sorted(listed, reverse=True)
    leftovers = [p.name for p in root.glob(".partial-*")]
    assert leftovers
    with pytest.raises(Exception, match="stale lock"):
        backup.backup(env)
    after = backup.backup(env, break_stale_lock=True)
    assert sorted(after.swept) == sorted(name.removeprefix(".partial-") for name in leftovers)
    assert not list(root.glob(".partial-*"))
    with pgtools.connect(env, localenv.database_name(env)) as conn:
        conn.execute("DROP TABLE bulk")


def test_drill_records_rto_and_metric(env: model.Environment) -> None:
    made = backup.backup_and_verify(env)
    report = backup.drill(env)
    assert report.ok and report.id == made and report.rto_seconds > 0 and not report.mismatches
    assert report.tables >= 3 and "digest equal" in report.redis
    scratch = [d for d in _databases(env) if "_drill_" in d]
    assert not scratch
    record = [r for r in audit.for_environment(env).records() if r["operation"] == "drill"][-1]
    assert record["result"] == "ok" and record["rto_seconds"] == report.rto_seconds
    text = backup.metrics_path(env).read_text()
    assert (
        f'maximus_backup_drill_last_success_timestamp_seconds{{service="hitl",environment="{env.name}"}}'
        in text
    )
    assert "maximus_backup_drill_rto_seconds" in text


@pytest.fixture
def replication(env: model.Environment) -> Iterator[None]:
    """The `replication` line pg_basebackup needs, for one test."""
    hba = localenv.etc_dir(env) / "pg_hba.conf"
    original = hba.read_text()
    hba.write_text(original + "host replication postgres 127.0.0.1/32 scram-sha-256\n")
    with pgtools.connect(env, "postgres") as conn:
        conn.execute("SELECT pg_reload_conf()")
    yield
    hba.write_text(original)
    with pgtools.connect(env, "postgres") as conn:
        conn.execute("SELECT pg_reload_conf()")


@pytest.mark.usefixtures("replication")
def test_physical_backup_verified_and_drilled(env: model.Environment) -> None:
    physical = env.model_copy(update={"backup": env.backup.model_copy(update={"method": "physical"})})
    made = backup.backup(physical)
    verified = backup.verify(physical, made.id)
    assert verified.ok and any("pg_verifybackup" in c for c in verified.checks)
    drilled = backup.drill(physical)
    assert drilled.ok and drilled.id == made.id and drilled.tables == made.tables
    with pytest.raises(BadInput, match="physical backup"):
        backup.restore(physical, made.id)
    # the drill unpacks the archive as it decrypts it: a changed chunk fails the drill, naming the file
    archive = next((env.state_path / "backups" / made.id / "postgres").glob("pgdata.tar*"))
    data = bytearray(archive.read_bytes())
    data[len(data) // 3] ^= 0x01
    archive.write_bytes(bytes(data))
    with pytest.raises(OperationFailed, match=archive.name):
        backup.drill(physical)
    assert not list((localenv.data_dir(env) / "drill").iterdir())
    backup_storage.for_environment(env).delete(made.id)


@pytest.mark.usefixtures("replication")
def test_physical_backup_made_before_streaming_still_verifies_and_drills(env: model.Environment) -> None:
    """Older physical backups hold the data directory under `pgdata/` in their archive."""
    physical = env.model_copy(update={"backup": env.backup.model_copy(update={"method": "physical"})})
    made = backup.backup(physical)
    key = backup_crypto.load_key(env)
    directory = env.state_path / "backups" / made.id
    manifest = json.loads((directory / backup_storage.MANIFEST).read_text())
    name = next(n for n in manifest["files"] if n.startswith("postgres/pgdata.tar"))
    plain, legacy = io.BytesIO(), io.BytesIO()
    with (directory / name).open("rb") as sealed:
        backup_crypto.unseal(sealed, plain, key, manifest["compression"], name)
    plain.seek(0)
    with tarfile.open(fileobj=plain) as source, tarfile.open(fileobj=legacy, mode="w") as target:
        top = tarfile.TarInfo("pgdata")
        top.type, top.mode = tarfile.DIRTYPE, 0o700
        target.addfile(top)
        for member in source.getmembers():
            data = source.extractfile(member) if member.isfile() else None
            member.name = f"pgdata/{member.name}"
            target.addfile(member, data)
    legacy.seek(0)
    with (directory / name).open("wb") as sealed:
        size, digest = backup_crypto.seal(legacy, sealed, key, manifest["compression"])
    manifest["files"][name].update(size=size, sha256=digest)
    del manifest["postgres"]["archive"]
    manifest["mac"] = backup_crypto.manifest_mac(manifest, key)
    (directory / backup_storage.MANIFEST).write_text(json.dumps(manifest))
    assert backup.verify(physical, made.id).ok
    drilled = backup.drill(physical)
    assert drilled.ok and drilled.id == made.id
    backup_storage.for_environment(env).delete(made.id)


@pytest.mark.usefixtures("replication")
def test_base_backup_stream_is_checked_against_its_manifest(env: model.Environment, tmp_path: Path) -> None:
    chunks: list[bytes] = []
    streamed = basebackup.stream(env, chunks.append, work=tmp_path / "work", tick=lambda _: None)
    data = b"".join(chunks)
    assert streamed == len(data)
    with tarfile.open(fileobj=io.BytesIO(data)) as tar:  # pg_basebackup's own tar, its WAL and manifest in it
        names = tar.getnames()
        version = tar.getmember("PG_VERSION")
    assert "backup_manifest" in names and any(re.fullmatch(r"pg_wal/[0-9A-F]{24}", n) for n in names)
    with pgtools.connect(env, "postgres") as conn:  # the slot that held the WAL went with its session
        row = conn.execute("SELECT count(*) FROM pg_replication_slots").fetchone()
    assert row == (0,)
    assert not list(basebackup.MEMORY_BACKED.glob(f"{basebackup.SPARSE_PREFIX}{os.getpid()}-*"))

    def scanned(stream: bytes, name: str) -> basebackup.TarScan:
        scan = basebackup.TarScan(tmp_path / name / "sparse", tmp_path / name / "kept")
        scan.feed(stream)
        return scan

    basebackup.check(env, scanned(data, "as-streamed"))
    changed = bytearray(data)  # one byte changed on its way: the CRC32C the manifest recorded names it
    changed[version.offset_data] ^= 0x01
    with pytest.raises(OperationFailed, match="PG_VERSION: CRC32C"):
        basebackup.check(env, scanned(bytes(changed), "changed"))
    with pgtools.connect(env, "postgres") as full:  # every slot taken: it says so, before any backup starts
        row = full.execute("SELECT current_setting('max_replication_slots')::int").fetchone()
        assert row is not None
        for number in range(row[0]):
            full.execute("SELECT pg_create_physical_replication_slot(%s, true, true)", (f"taken_{number}",))
        with pytest.raises(OperationFailed, match="max_replication_slots"):
            basebackup.stream(env, chunks.append, work=tmp_path / "no-slot", tick=lambda _: None)
    missing = scanned(data, "missing")  # a file the manifest lists is not there: pg_verifybackup names it
    (missing.sparse / "global" / "pg_control").unlink()
    with pytest.raises(OperationFailed, match="pg_control"):
        basebackup.check(env, missing)


def test_s3_storage_through_an_s3_compatible_fake(env: model.Environment) -> None:
    pytest.importorskip("moto")
    import boto3
    from moto.server import ThreadedMotoServer

    port = free_ports(1)[0]
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    try:
        client = boto3.client(
            "s3",
            endpoint_url=f"http://127.0.0.1:{port}",
            region_name="us-east-1",
            aws_access_key_id="test",
            aws_secret_access_key="test",
        )
        client.create_bucket(Bucket="maximus-backups")
        s3_env = env.model_copy(
            update={
                "backup": env.backup.model_copy(
                    update={
                        "storage": model.BackupStorage(
                            kind="s3", bucket="maximus-backups", endpoint=f"http://127.0.0.1:{port}"
                        )
                    }
                )
            }
        )
        store = backup_storage.for_environment(s3_env, client=client)
        assert isinstance(store, backup_storage.S3Storage)
        made = backup.backup(s3_env, storage=store)
        assert store.ids() == [made.id]
        keys = [o["Key"] for o in client.list_objects_v2(Bucket="maximus-backups")["Contents"]]
        assert f"maximus/{env.name}/{made.id}/manifest.json" in keys
        assert backup.verify(s3_env, made.id, storage=store).ok
        assert backup.drill(s3_env, storage=store).ok
        # a backup whose manifest never arrived is not listed
        client.put_object(
            Bucket="maximus-backups", Key=f"maximus/{env.name}/b-20200101T000000000000Z/x", Body=b"1"
        )
        assert store.ids() == [made.id]
        assert store.sweep() == []  # younger than an hour: maybe an upload in progress
        with pytest.MonkeyPatch.context() as patch:
            patch.setattr(backup_storage, "ABANDONED_AFTER", backup_storage.timedelta(seconds=-60))
            assert store.sweep() == ["b-20200101T000000000000Z"]
        store.delete(made.id)
        assert store.ids() == []
    finally:
        server.stop()
