"""The benchmark's own arithmetic: percentiles, work splitting, target verdicts."""

from __future__ import annotations

import contextlib
import io
from pathlib import Path

from twisted.trial import unittest

from wsserver.bench import cli


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

    def test_missed_target_says_where_it_is_explained(self):
        """A report with a target not met points to docs/performance.md; the
        targets are there (T1-T6), and nothing points to a BENCHMARK.md that a
        clone does not have."""
        results = {"verify": {"us_per_verify": 50.0}, "direct": {"cpu_us_per_msg": 100.0}}
        out = io.StringIO()
        with contextlib.redirect_stdout(out):
            cli.print_report(results)
        self.assertIn("NO", out.getvalue())
        self.assertIn("docs/performance.md", out.getvalue().split("NO", 1)[1])
        root = Path(__file__).parent.parent
        performance = (root / "docs" / "performance.md").read_text("utf-8")
        for target in ("T1", "T2", "T3", "T4", "T5", "T6"):
            self.assertRegex(performance, rf"\| {target} \|")
        for path in [root / "docs" / "performance.md", *(root / "wsserver" / "bench").glob("*.py")]:
            self.assertNotIn("BENCHMARK.md", path.read_text("utf-8"), path)
