"""The benchmark's own arithmetic: percentiles, work splitting, target verdicts."""

from __future__ import annotations

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
