"""`db.backup`, `db.restore` and the drill against the raw PostgreSQL tools, in the same run.

On a generated database of --size-mb (default 1024), the median wall time of --runs (default 3) runs
of each side, the two taking turns:
  raw `pg_dump -Fd -j2` (its default gzip) and `pg_dump -Fd -j2 -Z0`   vs  db.backup (logical, zstd)
  raw `pg_restore -j2` into a new database                           vs  db.restore into a new database
  raw `pg_basebackup -Fp -X stream`                                  vs  db.backup (physical, zstd)
then the drill's measured RTO and the backup's size under each compression. Target: within 1.3x of the
raw tool. What each side does is printed with the figures: ours does more (checksums, sealing,
verification), the raw tools run with their defaults.

Runs in a private single-machine environment on free ports (created and purged here; needs root, like
`invoke local.up`). Usage: python benchmarks/backup.py [--size-mb 1024] [--runs 3] [--keep]
"""

from __future__ import annotations

import argparse
import os
import secrets
import shutil
import socket
import statistics
import subprocess
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from _common import ROOT

from opskit import backup, backup_crypto, localenv, model, pgtools
from opskit.model import Environment

PORTS = tuple(model.LocalPorts.model_fields)
TARGET = 1.3
ROW_BYTES_ESTIMATE = 275  # database bytes per bench_events row, with bench_decisions and the indexes


def private_environment() -> Environment:
    directory = Path(tempfile.mkdtemp(prefix="maximus-bench-envs-"))
    os.environ[model.EXTRA_ENVIRONMENTS_VAR] = str(directory)
    name = f"bench-{secrets.token_hex(3)}"
    state = Path(tempfile.mkdtemp(prefix=f"maximus-{name}-"))
    state.chmod(0o755)
    data = yaml.safe_load((ROOT / "environments" / "local.yaml").read_text())
    sockets = [socket.socket() for _ in PORTS]
    for sock in sockets:
        sock.bind(("127.0.0.1", 0))
    data.update(
        name=name,
        state_dir=str(state),
        ports={p: s.getsockname()[1] for p, s in zip(PORTS, sockets, strict=True)},
    )
    for sock in sockets:
        sock.close()
    (directory / f"{name}.yaml").write_text(yaml.safe_dump(data, sort_keys=False))
    return model.load_environment(name)


def generate(env: Environment, size_mb: int) -> tuple[int, int]:
    """Fill three tables up to about size_mb; (rows, database bytes)."""
    rows = max(size_mb * 1024 * 1024 // ROW_BYTES_ESTIMATE, 1000)
    with pgtools.connect(env, localenv.database_name(env)) as conn:
        conn.execute(
            "CREATE TABLE bench_events "
            "(id bigint PRIMARY KEY, kind text, body text, at timestamptz, score float8)"
        )
        conn.execute(
            "CREATE TABLE bench_decisions (id bigint PRIMARY KEY, patch text, approved bool, meta jsonb)"
        )
        step = 500_000
        for start in range(1, rows + 1, step):
            stop = min(start + step - 1, rows)
            conn.execute(
                "INSERT INTO bench_events SELECT g, 'kind-' || (g %% 17), repeat(md5(g::text), 4), "
                "timestamptz '2026-01-01' + g * interval '1 second', random() FROM generate_series(%s, %s) g",
                (start, stop),
            )
            conn.execute(
                "INSERT INTO bench_decisions SELECT g, 'patch-' || g, g %% 3 = 0, "
                "jsonb_build_object('g', g, 'reason', md5(g::text)) FROM generate_series(%s, %s) g "
                "WHERE g %% 4 = 0",
                (start, stop),
            )
        conn.execute("VACUUM ANALYZE")
        row = conn.execute("SELECT pg_database_size(current_database())").fetchone()
        assert row is not None
        return rows, int(row[0])


@dataclass(frozen=True)
class Sample:
    seconds: float  # wall time
    cpu: float  # CPU seconds of the whole machine meanwhile: the servers' share included


def busy_cpu_seconds() -> float:
    """CPU time the machine has spent busy since boot, all CPUs together (/proc/stat)."""
    with open("/proc/stat") as stat:
        ticks = [int(field) for field in stat.readline().split()[1:]]
    idle = ticks[3] + ticks[4]  # idle and iowait
    return (sum(ticks) - idle) / os.sysconf("SC_CLK_TCK")


def wall(call: Callable[[], object]) -> Sample:
    """What the call took as its caller waits for it (for ours: lock, audit record and publishing in it)."""
    started, busy = time.perf_counter(), busy_cpu_seconds()
    call()
    return Sample(time.perf_counter() - started, busy_cpu_seconds() - busy)


def timed(argv: list[str], env: Environment) -> Sample:
    return wall(lambda: subprocess.run(argv, env=pgtools.tool_env(env), check=True, capture_output=True))


def alternate(
    runs: int, raw: Callable[[], Sample], ours: Callable[[], Sample]
) -> tuple[list[Sample], list[Sample]]:
    """Both sides `runs` times, taking turns, so that a busy moment of a shared machine falls on both."""
    raws, ourses = [], []
    for _ in range(runs):
        raws.append(raw())
        ourses.append(ours())
    return raws, ourses


def allow_replication(env: Environment) -> None:
    hba = localenv.etc_dir(env) / "pg_hba.conf"
    hba.write_text(hba.read_text() + "host replication postgres 127.0.0.1/32 scram-sha-256\n")
    with pgtools.connect(env, "postgres") as conn:
        conn.execute("SELECT pg_reload_conf()")


def with_backup(env: Environment, **changes: Any) -> Environment:
    return env.model_copy(update={"backup": env.backup.model_copy(update=changes)})


def per_table_checksums(env: Environment) -> None:
    """What a physical backup counts beside its stream."""
    with pgtools.connect(env, localenv.database_name(env)) as conn:
        pgtools.table_checksums_alone(conn)


def drop(env: Environment, name: str) -> None:
    with pgtools.connect(env, "postgres") as conn:
        pgtools.drop_database(conn, name)


def line(label: str, samples: list[Sample], baseline: list[Sample] | None = None) -> float | None:
    """Print the median wall time (its range over the runs) and CPU time; the ratio of the medians to the
    baseline's."""
    seconds = [sample.seconds for sample in samples]
    median = statistics.median(seconds)
    ratio = median / statistics.median(b.seconds for b in baseline) if baseline else None
    spread = f"({min(seconds):.2f}-{max(seconds):.2f})" if len(seconds) > 1 else ""
    cpu = statistics.median(sample.cpu for sample in samples)
    shown = f"   {ratio:5.2f}x the raw tool" if ratio is not None else ""
    print(f"{label:<54} {median:6.2f} s {spread:<11} cpu {cpu:5.2f} s{shown}")
    return ratio


SIDES = """what each side does:
  raw pg_dump -Fd -j2          dump (gzip, or -Z0), fsync
  db.backup logical            pg_dump -Fd -j2 -Z0 in an exported snapshot + per-table checksums in that
                               snapshot + zstd + AES-256-GCM + sha256 of every file + fsync, a Redis RDB
                               (BGSAVE, redis-check-rdb, loaded in a scratch server), manifest, publish
  raw pg_restore -j2           restore of the raw (gzip) dump into a new database
  db.restore                   sha256 + AES-256-GCM + zstd of every file while pg_restore -j2 reads it
                               (named pipes), per-table checksums of the new database compared with the
                               manifest's, the RDB loaded into a scratch Redis and its digest compared
  raw pg_basebackup -Fp -Xs    base backup to a plain directory, fsync (the target's baseline); for
                               reference also -Ft with its own client-side zstd at our level
  db.backup physical           pg_basebackup's own tar (-X fetch, its WAL held by a temporary slot)
                               streamed, no plain copy: CRC32C of every file against the backup
                               manifest as it passes, pg_verifybackup --skip-checksums on a sparse copy
                               (manifest, file list, sizes, WAL), zstd + AES-256-GCM + fsync of the
                               archive, per-table checksums while it runs, Redis as above, manifest, publish
ours is timed as its caller waits for it (lock, audit record, publishing included)
"""


def run(env: Environment, size_mb: int, runs: int) -> None:
    scratch = Path(tempfile.mkdtemp(prefix="bench-", dir=env.state_path))
    db = localenv.database_name(env)
    tool = pgtools.connect_args(env)
    started = time.perf_counter()
    rows, size = generate(env, size_mb)
    print(
        f"generated {rows} + {rows // 4} rows, database {size / 1e6:.0f} MB "
        f"in {time.perf_counter() - started:.0f} s; {os.cpu_count()} CPUs, jobs {env.backup.jobs}; "
        f"each figure the median of {runs} runs, the two sides taking turns\n"
    )
    print(SIDES)
    allow_replication(env)
    ratios: dict[str, float | None] = {}

    def raw_dump(*options: str) -> Sample:
        shutil.rmtree(scratch / "raw", ignore_errors=True)  # the last dump stays: the raw restore reads it
        return timed(
            [pgtools.pg_bin(env, "pg_dump"), *tool, "-Fd", "-j2", *options, "-f", str(scratch / "raw"), db],
            env,
        )

    made: list[str] = []

    def our_backup(**changes: Any) -> Sample:
        def call() -> None:
            report = backup.backup(with_backup(env, **changes))
            assert isinstance(report, backup.BackupReport)
            made.append(report.id)

        return wall(call)

    raw_z0 = [raw_dump("-Z0") for _ in range(runs)]
    raw_gzip, ours = alternate(runs, raw_dump, our_backup)
    line("raw pg_dump -Fd -j2 (gzip, its default)", raw_gzip)
    line("raw pg_dump -Fd -j2 -Z0", raw_z0)
    ratios["db.backup logical"] = line("db.backup logical (zstd + AES-256-GCM, checksums)", ours, raw_gzip)
    logical_id = made[-1]

    def raw_restore() -> Sample:
        with pgtools.connect(env, "postgres") as conn:
            conn.execute(f"CREATE DATABASE bench_raw OWNER {db}")
        sample = timed(
            [pgtools.pg_bin(env, "pg_restore"), *tool, "-j2", "-d", "bench_raw", str(scratch / "raw")], env
        )
        drop(env, "bench_raw")
        return sample

    def our_restore() -> Sample:
        sample = wall(lambda: backup.restore(env, logical_id, into="bench_ours"))
        drop(env, "bench_ours")
        return sample

    raw_restores, our_restores = alternate(runs, raw_restore, our_restore)
    shutil.rmtree(scratch / "raw")
    line("raw pg_restore -j2 into a new database", raw_restores)
    ratios["db.restore"] = line(
        "db.restore into a new database (incl. checksums)", our_restores, raw_restores
    )

    def raw_base(*options: str) -> Sample:
        argv = [
            pgtools.pg_bin(env, "pg_basebackup"),
            *tool,
            "-D",
            str(scratch / "base"),
            "-Xstream",
            "-cfast",
        ]
        sample = timed([*argv, *options], env)
        shutil.rmtree(scratch / "base")
        return sample

    raw_bases, physicals = alternate(runs, lambda: raw_base("-Fp"), lambda: our_backup(method="physical"))
    physical_id = made[-1]
    # for reference: the raw tool compressing like ours (not the target's baseline)
    raw_zstd = [
        raw_base("-Ft", f"--compress=client-zstd:level={backup_crypto.ZSTD_LEVEL}") for _ in range(runs)
    ]
    line("raw pg_basebackup -Fp -X stream", raw_bases)
    ratios["db.backup physical"] = line(
        "db.backup physical (zstd, AES, checked, checksums)", physicals, raw_bases
    )
    line(
        f"  for reference: raw pg_basebackup -Ft client-zstd:{backup_crypto.ZSTD_LEVEL}, ours vs it", raw_zstd
    )
    line("  db.backup physical, as above", physicals, raw_zstd)
    alone = [wall(lambda: per_table_checksums(env)) for _ in range(runs)]
    line("  of which: per-table checksums, alone", alone)

    drill = backup.drill(env)  # the latest backup: the physical one
    print(f"{'drill RTO, physical (scratch cluster, compare)':<54} {drill.rto_seconds:6.2f} s")
    backup.backup(env)
    drill = backup.drill(env)
    print(f"{'drill RTO, logical (scratch database, compare)':<54} {drill.rto_seconds:6.2f} s")

    print(f"\nbackup size of a {size / 1e6:.0f} MB database:")
    sizes = {m["id"]: m["size"] for m in backup.list_backups(env)}
    print(f"  physical zstd {sizes[physical_id] / 1e6:9.1f} MB")
    for compression in ("none", "gzip", "zstd"):
        report = backup.backup(with_backup(env, compression=compression))
        assert isinstance(report, backup.BackupReport)
        print(f"  logical  {compression:<5}{report.size / 1e6:9.1f} MB   in {report.seconds:6.2f} s")
    print(f"\ntarget: within {TARGET}x of the raw tool (medians)")
    for name, ratio in ratios.items():
        verdict = "met" if ratio is not None and ratio <= TARGET else "NOT met"
        print(f"  {name:<22} {ratio:5.2f}x  {verdict}" if ratio is not None else f"  {name}: no figure")
    shutil.rmtree(scratch, ignore_errors=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size-mb", type=int, default=1024, help="size of the generated data (default 1024)")
    parser.add_argument("--runs", type=int, default=3, help="runs of each side, taking turns (default 3)")
    parser.add_argument("--keep", action="store_true", help="leave the private environment running")
    args = parser.parse_args()
    env = private_environment()
    print(f"private environment {env.name} in {env.state_dir}")
    localenv.up(env)
    try:
        run(env, args.size_mb, max(args.runs, 1))
    finally:
        if not args.keep:
            localenv.down(env, purge=True)
            shutil.rmtree(os.environ[model.EXTRA_ENVIRONMENTS_VAR], ignore_errors=True)


if __name__ == "__main__":
    main()
