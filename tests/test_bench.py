"""The benchmark's own arithmetic: percentiles, work splitting, target verdicts."""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import shutil
import uuid
from pathlib import Path

from twisted.trial import unittest

from tests.services import ADMIN_URL, REDIS_HOST, REDIS_PORT, require_postgres, require_redis
from wsserver.bench import cli, services


class BenchArithmeticTests(unittest.TestCase):
    def test_percentile(self):
        """Nearest-rank percentiles over unsorted data."""
        values = list(range(100, 0, -1))
        self.assertEqual(cli.percentile(values, 50), 51)
        self.assertEqual(cli.percentile(values, 99), 99)
        self.assertEqual(cli.percentile(values, 100), 100)
        self.assertNotEqual(cli.percentile([], 50), cli.percentile([], 50))  # NaN

    def test_split_keeps_every_item_once(self):
        """Work split over client processes loses and repeats nothing."""
        parts = cli.split(list(range(10)), 3)
        self.assertEqual(sorted(x for p in parts for x in p), list(range(10)))
        self.assertEqual([len(p) for p in parts], [4, 3, 3])

    def test_targets_verdicts(self):
        """Each target compares the right figures; any loss or refusal fails T6."""
        results = {
            "verify": {"us_per_verify": 60.0},
            "direct": {"cpu_us_per_msg": 78.0, "lost": 0, "refused": 0, "closed_early": 0},
            "relay": {"cpu_us_per_msg": 40.0, "lost": 0, "refused": 0, "closed_early": 0},
            "direct-unsigned": {"cpu_us_per_msg": 81.0, "lost": 0, "refused": 0, "closed_early": 0},
            "latency": {"p99_ms": 4.9, "refused": 0, "lost": 0, "closed_early": 0},
            "broadcast": {
                "deliveries_per_cpu_s": 200_000,
                "lost": 0,
                "refused": 0,
                "closed_early": 0,
            },
            "idle": {
                "plain": {"kib_per_connection": 12.0, "closed_early": 0},
                "tls": {"kib_per_connection": 40.1, "closed_early": 0},
            },
        }
        self.assertEqual(
            [met for _, _, _, met in cli.targets(results)],
            [True, False, True, True, True, False, True],
        )
        results["latency"]["lost"] = 1
        rows = cli.targets(results)
        self.assertFalse(rows[2][3])  # T3 needs no errors
        self.assertFalse(rows[-1][3])  # T6
        self.assertEqual(rows[-1][1], "1 / 0")

    def test_t7_compares_cluster_with_single_node_of_the_same_run(self):
        """T7 is the cluster's CPU per message (every process counted) over the
        single-node direct-unsigned figure of the same run, met up to 2.5x."""
        cluster = {"cpu_us_per_msg": 250.0, "single_node_cpu_us_per_msg": 100.0, "lost": 0}
        t7 = "T7 cluster CPU/msg vs single node"
        rows = {row[0]: (row[1], row[3]) for row in cli.targets({"cluster": cluster})}
        self.assertEqual(rows[t7], ("2.50x", True))
        cluster["cpu_us_per_msg"] = 251.0
        rows = {row[0]: (row[1], row[3]) for row in cli.targets({"cluster": cluster})}
        self.assertEqual(rows[t7], ("2.51x", False))
        cluster["lost"] = 2
        self.assertEqual(cli.targets({"cluster": cluster})[-1][1], "2 / 0")  # T6 counts it

    def test_t8_compares_latency_with_the_relay_at_the_same_rate(self):
        """T8 is the latency workload's CPU per message over relay-latency's
        (the bare relay under the same offered load), met up to 2.0x; without
        relay-latency in the run it is not judged."""
        latency = {"cpu_us_per_msg": 312.0, "p99_ms": 2.0, "lost": 0, "refused": 0}
        relay = {"cpu_us_per_msg": 156.0, "lost": 0, "refused": 0}
        t8 = "T8 latency CPU/msg vs relay-latency"
        rows = {row[0]: (row[1], row[3]) for row in cli.targets({"latency": latency})}
        self.assertNotIn(t8, rows)
        results = {"latency": latency, "relay-latency": relay}
        rows = {row[0]: (row[1], row[3]) for row in cli.targets(results)}
        self.assertEqual(rows[t8], ("2.00x", True))
        latency["cpu_us_per_msg"] = 313.0
        rows = {row[0]: (row[1], row[3]) for row in cli.targets(results)}
        self.assertEqual(rows[t8], ("2.01x", False))
        # latency --expire shares its server with retention: not T8's figure.
        latency["expired"] = 1000
        self.assertNotIn(t8, {row[0] for row in cli.targets(results)})

    def test_cpu_delta_counts_every_process_by_group(self):
        """CPU between two meter readings is summed per group (the key before
        ':'); a process that started during the run is counted whole, one that
        ended is reported as gone, not as negative CPU."""
        before = {"node_a:": (1.0, 0.5), "postgres:10": (2.0, 1.0), "postgres:11": (5.0, 5.0)}
        after = {"node_a:": (3.0, 1.0), "postgres:10": (2.5, 1.5), "postgres:12": (0.25, 0.25)}
        cpu, system, parts, gone = cli.cpu_delta(before, after)
        self.assertEqual(parts, {"node_a": 2.5, "postgres": 1.5})
        self.assertEqual(cpu, 4.0)
        self.assertEqual(system, 1.25)
        self.assertEqual(gone, 1)


def unreachable_args(**extra: object) -> argparse.Namespace:
    """Options naming a PostgreSQL and a Redis on a port where nothing listens."""
    port = cli.free_port()
    return argparse.Namespace(
        database=f"postgresql://postgres@127.0.0.1:{port}/postgres",
        broker=f"redis://127.0.0.1:{port}/14",
        **extra,
    )


class BenchServicesTests(unittest.TestCase):
    """Which workloads run without the cluster's services, and the helpers that
    use them."""

    def test_all_leaves_out_cluster_and_workers_without_their_services(self):
        """`all` leaves out cluster and workers, saying why, when PostgreSQL and
        Redis do not answer (a CI without them still runs the rest)."""
        err = io.StringIO()
        with contextlib.redirect_stderr(err):
            names = cli.all_workloads(unreachable_args())
        self.assertNotIn("cluster", names)
        self.assertNotIn("workers", names)
        self.assertIn("direct-unsigned", names)
        self.assertIn("relay-latency", names)  # T8's ceiling, also in --quick
        self.assertNotIn("latency-unsigned", names)  # asked for by name only
        self.assertIn("cluster left out: PostgreSQL does not answer", err.getvalue())
        self.assertIn("workers left out: Redis does not answer", err.getvalue())

    def test_cluster_named_services_that_do_not_answer_is_a_clear_error(self):
        """`wsserver-bench cluster` with a --database that does not answer stops
        with the reason and the options to fix, starting nothing."""
        bench = cli.Bench(unreachable_args(quick=True, duration=None))
        self.addCleanup(shutil.rmtree, bench.workdir, True)
        with self.assertRaises(RuntimeError) as caught:
            bench.cluster()
        self.assertIn("PostgreSQL does not answer", str(caught.exception))
        self.assertIn("--database", str(caught.exception))
        self.assertEqual(bench.results, {})

    def test_postgres_database_of_its_own_and_its_backends(self):
        """The benchmark creates its own database, sees the backend serving a
        connection to it (the CPU it counts) and drops it, connections and all."""
        require_postgres()
        import psycopg

        db = services.Postgres(ADMIN_URL)
        db.create()
        self.addCleanup(db.drop)
        with psycopg.connect(db.url, autocommit=True) as conn:
            backend = conn.execute("SELECT pg_backend_pid()").fetchone()[0]
            self.assertEqual(db.backends(), [backend])
            self.assertIsNotNone(services.pid_cpu(backend))
            db.drop()
        exists = db._execute("SELECT 1 FROM pg_database WHERE datname = %s", (db.name,))
        self.assertEqual(exists, [])

    def test_redis_clear_deletes_only_the_servers_keys_of_its_number(self):
        """Clearing deletes the wsserver:<db>: keys of its own database number
        and nothing else; the redis-server's pid is found for its CPU."""
        require_redis()
        redis = services.Redis(f"redis://{REDIS_HOST}:{REDIS_PORT}/13")
        other = services.Redis(f"redis://{REDIS_HOST}:{REDIS_PORT}/12")
        tag = uuid.uuid4().hex
        mine, foreign = f"wsserver:13:bench-test-{tag}", f"bench-test-{tag}"
        elsewhere = f"wsserver:13:bench-test-{tag}"
        redis.command("SET", mine, "1")
        redis.command("SET", foreign, "1")
        other.command("SET", elsewhere, "1")
        self.addCleanup(redis.command, "DEL", foreign)
        self.addCleanup(other.command, "DEL", elsewhere)
        self.assertGreaterEqual(redis.clear(), 1)
        self.assertEqual(redis.command("EXISTS", mine), 0)
        self.assertEqual(redis.command("EXISTS", foreign), 1)
        self.assertEqual(other.command("EXISTS", elsewhere), 1)
        self.assertIsNotNone(services.pid_cpu(redis.pid()))

    def test_cluster_short_run_end_to_end(self):
        """A short `wsserver-bench cluster` runs two nodes on a database of its
        own: every message crosses nodes and arrives, the CPU of the nodes,
        PostgreSQL and Redis is counted, T7 is printed, and the database and
        the Redis keys are gone afterwards."""
        require_postgres()
        require_redis()
        broker = f"redis://{REDIS_HOST}:{REDIS_PORT}/13"
        out = Path(self.mktemp())
        stdout = io.StringIO()
        with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(io.StringIO()):
            code = cli.main(
                [
                    "cluster",
                    "--duration",
                    "1",
                    "--pairs",
                    "4",
                    "--receivers",
                    "20",
                    "--database",
                    ADMIN_URL,
                    "--broker",
                    broker,
                    "--json",
                    str(out),
                ]
            )
        self.assertEqual(code, 0)
        cluster = json.loads(out.read_text())["results"]["cluster"]
        self.assertGreater(cluster["delivered"], 0)
        self.assertEqual(cluster["delivered"], cluster["sent"])
        self.assertEqual(cluster["lost"], 0)
        for group in ("node_a", "node_b", "postgres", "redis"):
            self.assertGreater(cluster[f"cpu_us_{group}"], 0, group)
        self.assertGreater(cluster["broadcast_deliveries_per_s"], 0)
        self.assertIn("T7 cluster CPU/msg vs single node", stdout.getvalue())
        left = services.Postgres(ADMIN_URL)._execute(
            "SELECT datname FROM pg_database WHERE datname LIKE 'wsserver_bench_%%'"
        )
        self.assertTrue(cluster["database"].startswith("wsserver_bench_"))
        self.assertNotIn(cluster["database"], [name for (name,) in left])
        self.assertEqual(services.Redis(broker).command("KEYS", "wsserver:13:*"), [])


class FakeTerminal(io.StringIO):
    def isatty(self) -> bool:
        return True


class BenchOutputTests(unittest.TestCase):
    """What the benchmark prints for a person or a log file."""

    def test_progress_is_rewritten_in_place_on_a_terminal_only(self):
        """On a terminal progress rewrites one line with \\r; into a file or a pipe
        it is plain lines, each phase once."""
        for stream, overwrite in ((FakeTerminal(), True), (io.StringIO(), False)):
            progress = cli.Progress(stream)
            for _ in range(3):
                progress.show("direct", "connecting (0/2)")
            progress.show("direct", "running", " 1.0/3 s")
            progress.show("direct", "running", " 2.0/3 s")
            progress.clear()
            text = stream.getvalue()
            self.assertEqual("\r" in text, overwrite, repr(text))
            if not overwrite:
                self.assertEqual(
                    text.splitlines(), ["  direct: connecting (0/2)", "  direct: running"]
                )

    def test_summary_counts_workloads_in_english(self):
        """'1 workload', '8 workloads'."""
        self.assertEqual(cli.summary(1, 3.2), "1 workload in 3 s")
        self.assertEqual(cli.summary(8, 61), "8 workloads in 61 s")

    def test_help_is_plain_and_points_to_the_targets(self):
        """--help shows no reStructuredText backticks and says where the
        workloads and targets are explained."""
        text = cli.make_parser().format_help()
        self.assertNotIn("`", text)
        self.assertIn("docs/performance.md", text)

    def test_all_alone_and_each_workload_once(self):
        """``all`` with other names, or a name given twice (whose second run
        would replace the first's figures), is refused before anything runs."""
        for argv in (["all", "connect"], ["connect", "relay-connect", "connect"]):
            with contextlib.redirect_stderr(io.StringIO()) as err, self.assertRaises(SystemExit):
                cli.main(argv)
            self.assertIn("error:", err.getvalue())

    def test_missed_target_says_where_it_is_explained(self):
        """A report with a target not met points to docs/performance.md; the
        targets are there (T1-T7), and nothing points to a BENCHMARK.md that a
        clone does not have."""
        results = {"verify": {"us_per_verify": 50.0}, "direct": {"cpu_us_per_msg": 100.0}}
        out = io.StringIO()
        with contextlib.redirect_stdout(out):
            cli.print_report(results)
        self.assertIn("NO", out.getvalue())
        self.assertIn("docs/performance.md", out.getvalue().split("NO", 1)[1])
        root = Path(__file__).parent.parent
        performance = (root / "docs" / "performance.md").read_text("utf-8")
        for target in ("T1", "T2", "T3", "T4", "T5", "T6", "T7"):
            self.assertRegex(performance, rf"\| {target} \|")
        for path in [root / "docs" / "performance.md", *(root / "wsserver" / "bench").glob("*.py")]:
            self.assertNotIn("BENCHMARK.md", path.read_text("utf-8"), path)


def soak_report(**extra: object) -> dict:
    """One soak worker's report with nothing lost, changed by ``extra``."""
    report = {
        "connections": 10,
        "direct_sent": 5,
        "direct_acked": 5,
        "direct_resent": 1,
        "direct_unacked": 0,
        "direct_lost": 0,
        "direct_missed": 0,
        "broadcast_sent": 0,
        "broadcast_acked": [],
        "broadcast_counts": {},
        "reconnects": 3,
        "connect_errors": 0,
        "logins": 1,
        "login_errors": 0,
        "refused": 0,
        "closed_early": 0,
    }
    report.update(extra)
    return report


class BenchSoakTests(unittest.TestCase):
    """The soak (T9): connections held with a trickle of traffic, RSS sampled."""

    def test_rss_growth_is_measured_from_the_baseline_to_the_end(self):
        """Growth runs from the first sample at or after the baseline (minute
        1) to the last one; what happened before the baseline is not counted."""
        samples = [[0, 50.0, 70.0], [30, 90.0, 70.0], [60, 100.0, 80.0], [600, 104.0, 88.0]]
        self.assertEqual(cli.rss_growth(samples, 1, 60), (100.0, 4.0))
        self.assertEqual(cli.rss_growth(samples, 2, 60), (80.0, 10.0))
        self.assertEqual(cli.rss_growth(samples, 1, 45), (100.0, 4.0))

    def test_a_broadcast_missed_by_one_connection_is_counted(self):
        """A broadcast acknowledged in one process must reach every connection
        of its server, in every process: one connection without it is a missed
        delivery; a broadcast no connection got is lost; direct losses add up."""
        sender = soak_report(broadcast_acked=[7, 9], broadcast_counts={"7": 10, "9": 10})
        other = soak_report(broadcast_counts={"7": 9, "9": 10})
        tls = soak_report(broadcast_acked=[8], direct_lost=2, direct_missed=3)
        samples = [[0, 10.0, 20.0], [1, 10.0, 20.0]]
        figures = cli.soak_figures(
            [sender, other, tls], ["plain", "plain", "tls"], samples, 3.0, 1.0
        )
        self.assertEqual(figures["broadcast_acked"], 3)
        self.assertEqual(figures["lost"], 1 + 2)  # broadcast 8 reached no one; 2 direct
        self.assertEqual(figures["missed_deliveries"], 1 + 10 + 3)
        self.assertEqual(figures["connections_plain"], 20)
        self.assertEqual(figures["connections_tls"], 10)
        rows = {row[0]: row for row in cli.targets({"soak": figures})}
        self.assertIsNone(rows["T9 soak RSS growth after minute 1 / lost"][3])  # 3 s: not judged
        figures["judged"] = True
        rows = {row[0]: row for row in cli.targets({"soak": figures})}
        self.assertFalse(rows["T9 soak RSS growth after minute 1 / lost"][3])  # lost
        self.assertFalse(rows["T6 acked lost / unexpected refusals"][3])

    def test_tiny_soak_loses_nothing(self):
        """A 3-second soak of 30 connections (10 TLS): every kind of traffic
        happens, every acknowledged message reaches every connection of its
        recipient (reconnects come back with since), the RSS of both servers
        is sampled, and T9 is printed as not judged for so short a run."""
        out = Path(self.mktemp())
        plot = Path(self.mktemp() + ".png")
        stdout = io.StringIO()
        with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(io.StringIO()):
            args = ["soak", "--duration", "3", "--connections", "30", "--json", str(out)]
            code = cli.main([*args, "--plot", str(plot)])
        self.assertEqual(code, 0)
        soak = json.loads(out.read_text())["results"]["soak"]
        self.assertEqual((soak["connections_plain"], soak["connections_tls"]), (20, 10))
        for key in ("direct_acked", "broadcast_acked", "reconnects", "logins"):
            self.assertGreater(soak[key], 0, key)
        self.assertEqual(soak["direct_acked"], soak["direct_sent"])
        for key in ("lost", "missed_deliveries", "refused", "closed_early", "errors"):
            self.assertEqual(soak[key], 0, key)
        self.assertGreaterEqual(len(soak["rss_samples"]), 5)
        for row in soak["rss_samples"]:
            self.assertEqual(len(row), 3)
            self.assertGreater(min(row[1:]), 10)  # MiB: a Python server is never less
        self.assertEqual(
            soak["rss_growth_pct"], max(soak["rss_plain_growth_pct"], soak["rss_tls_growth_pct"])
        )
        self.assertFalse(soak["judged"])
        self.assertRegex(stdout.getvalue(), r"T9 soak RSS growth after minute 1 / lost .* -\n")
        try:
            import matplotlib  # noqa: F401
        except ImportError:
            return
        self.assertEqual(plot.read_bytes()[:8], b"\x89PNG\r\n\x1a\n")


class BenchConnectTests(unittest.TestCase):
    """The connect workload (T11) and its relay-connect ceiling."""

    def test_connect_and_relay_connect_in_one_run(self):
        """A 2-second run of both: connects happen on each, none fails, every
        connect of wsserver came back with the live message (the ids it
        learnt became its next since), and T11 is judged from the two."""
        out = Path(self.mktemp())
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
            code = cli.main(["relay-connect", "connect", "--duration", "2", "--json", str(out)])
        self.assertEqual(code, 0)
        data = json.loads(out.read_text())
        for name in ("relay-connect", "connect"):
            figures = data["results"][name]
            self.assertGreater(figures["connects"], 10, name)
            self.assertEqual(figures["errors"], 0, name)
            self.assertEqual(figures["replayed"], 0, name)  # since was each one's last id
            self.assertGreater(figures["cpu_us_per_connect"], 0, name)
        rows = {row["target"]: row for row in data["targets"]}
        self.assertIn("T11 connect CPU vs relay-connect", rows)

    def test_t11_row(self):
        rows = {
            row[0]: row
            for row in cli.targets(
                {
                    "connect": {"cpu_us_per_connect": 1500.0},
                    "relay-connect": {"cpu_us_per_connect": 1000.0},
                }
            )
        }
        self.assertEqual(rows["T11 connect CPU vs relay-connect"][1:], ("1.50x", "<= 2.00x", True))
        self.assertNotIn("T11 connect CPU vs relay-connect", dict.fromkeys(cli.targets({})))


class BenchHistoryTests(unittest.TestCase):
    """The history workload (T10): pages, replays and the replay's query plans."""

    def run_history(self, *extra: str) -> dict:
        out = Path(self.mktemp())
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
            code = cli.main(
                ["history", "--quick", "--history-sizes", "4000,6000", "--json", str(out), *extra]
            )
        self.assertEqual(code, 0)
        return json.loads(out.read_text())["results"]["history"]

    def check_engine(self, history: dict, engine: str) -> None:
        for size in (4000, 6000):
            key = f"{engine}_{size}"
            self.assertGreater(history[f"{key}_replay_p50_ms"], 0)
            self.assertGreaterEqual(
                history[f"{key}_replay_p99_ms"], history[f"{key}_replay_p50_ms"]
            )
            self.assertGreater(history[f"{key}_query_p50_ms"], 0)
            self.assertGreater(history[f"{key}_page_p50_ms"], 0)
            self.assertGreaterEqual(history[f"{key}_page_p99_ms"], history[f"{key}_page_p50_ms"])
            self.assertGreater(history[f"{key}_page_query_p50_ms"], 0)
            self.assertTrue(history[f"{key}_page_plan_uses_index"], history[f"{key}_page_plan"])
            self.assertTrue(history[f"{key}_plan_uses_indexes"], history[f"{key}_plan"])
        self.assertIn(f"{engine}_replay_p99_ratio", history)

    def test_sqlite_replays_bring_256_messages_with_index_plans(self):
        """Every timed replay brings its 256 messages and every timed page its
        50, and on SQLite the replay query searches the recipient indexes."""
        history = self.run_history()
        self.check_engine(history, "sqlite")
        self.assertEqual(history["errors"], 0)
        self.assertNotIn("postgres_4000_replay_p50_ms", history)  # quick: SQLite only

    def test_postgres_replays_and_the_database_is_dropped(self):
        """The same on PostgreSQL, in a database of its own, dropped after."""
        require_postgres()
        history = self.run_history("--database", ADMIN_URL)
        self.check_engine(history, "postgres")
        self.assertEqual(history["errors"], 0)
        name = history["postgres_database"]
        self.assertTrue(name.startswith("wsserver_bench_"))
        left = services.Postgres(ADMIN_URL)._execute(
            "SELECT 1 FROM pg_database WHERE datname = %s", (name,)
        )
        self.assertEqual(left, [])

    def test_plan_check_catches_a_replay_without_its_index(self):
        """Without the (recipient, id) index the replay query scans by id or the
        whole table, and the plan check says so."""
        from wsserver.bench import history

        path = self.mktemp()
        data = history.History()
        history.load_sqlite(path, data, 4000)
        replays = data.replays(3)
        _, plan = history.query_times("sqlite", path, replays)
        self.assertTrue(history.plan_uses_indexes("sqlite", plan), plan)
        import sqlite3

        with sqlite3.connect(path) as conn:
            conn.execute("DROP INDEX messages_recipient")
        _, plan = history.query_times("sqlite", path, replays)
        self.assertFalse(history.plan_uses_indexes("sqlite", plan), plan)

    def test_plan_check_tells_a_merge_that_stops_from_a_sort_of_everything(self):
        """A replay page's cost is independent of the backlog only when the
        plan merges the branches in id order and stops at the page: SQLite's
        MERGE, PostgreSQL's Merge Append; an Append under a Sort reads every
        row after since first."""
        from wsserver.bench import history

        sqlite_merge = ["MERGE (UNION ALL)", "LEFT", "SEARCH messages USING INDEX x"]
        sqlite_sort = [*sqlite_merge, "USE TEMP B-TREE FOR ORDER BY"]
        pg_sort = ["Limit", "  ->  Sort", "        Sort Key: messages.id", "  ->  Append"]
        pg_merge = ["Limit", "  ->  Merge Append", "        Sort Key: messages.id", "  ->  Limit"]
        self.assertTrue(history.plan_stops_early("sqlite", sqlite_merge))
        self.assertFalse(history.plan_stops_early("sqlite", sqlite_sort))
        self.assertFalse(history.plan_stops_early("postgres", pg_sort))
        self.assertTrue(history.plan_stops_early("postgres", pg_merge))


class BenchTracemallocTests(unittest.TestCase):
    def test_diff_names_what_grew_after_the_baseline(self):
        """The soak's --tracemalloc report compares the first snapshot taken
        after the baseline with the last, and names the line that allocated
        what grew; snapshots before the baseline are not used."""
        import time
        import tracemalloc

        where = Path(self.mktemp())
        where.mkdir()
        tracemalloc.start(4)
        self.addCleanup(tracemalloc.stop)
        kept: list[bytes] = []
        times = []
        for n in range(3):
            kept.extend(bytes(1000 + n) for _ in range(500 * n))  # the growth
            path = where / f"snapshot-1-{n}.pickle"
            tracemalloc.take_snapshot().dump(str(path))
            times.append(f"{path} {time.monotonic():.3f}")
        (where / "times-1.txt").write_text("\n".join(times) + "\n")
        baseline = float(times[1].rsplit(" ", 1)[1])
        report = cli.tracemalloc_diff(where, baseline)
        self.assertIn("snapshot-1-1.pickle -> ", report)
        self.assertIn("test_bench.py", report.split("KiB", 2)[2])  # the first stack shown
        self.assertIn("fewer than two", cli.tracemalloc_diff(where, time.monotonic() + 60))
