"""What ``pip install .`` ships: every package and data file of the tree.

A non-editable install (CI's, a user's) has only what setup.cfg names, so a
package or data file missing there works in a development checkout and
fails for everyone else.
"""

from __future__ import annotations

import configparser
import fnmatch
from pathlib import Path

from twisted.trial import unittest

ROOT = Path(__file__).resolve().parents[1]


def _setup_cfg() -> configparser.ConfigParser:
    parser = configparser.ConfigParser()
    parser.read(ROOT / "setup.cfg")
    return parser


class PackagingTests(unittest.TestCase):
    def test_every_package_is_listed(self):
        """Every directory of wsserver/ with an __init__.py is a package named in
        setup.cfg (a missing one is left out of a non-editable install)."""
        listed = set(_setup_cfg()["options"]["packages"].split())
        found = {
            ".".join(init.parent.relative_to(ROOT).parts)
            for init in (ROOT / "wsserver").rglob("__init__.py")
        }
        self.assertEqual(found - listed, set())
        self.assertIn("twisted.plugins", listed)

    def test_every_data_file_is_shipped(self):
        """Every file of a package that is not Python (schema files, the web
        client) matches a package_data pattern of its package."""
        data = _setup_cfg()["options.package_data"]
        missing = []
        for path in (ROOT / "wsserver").rglob("*"):
            if not path.is_file() or path.suffix in (".py", ".pyc") or "__pycache__" in path.parts:
                continue
            package_dir = path.parent
            while not (package_dir / "__init__.py").exists():
                package_dir = package_dir.parent
            package = ".".join(package_dir.relative_to(ROOT).parts)
            relative = path.relative_to(package_dir).as_posix()
            patterns = [p.strip() for p in data.get(package, "").replace(",", " ").split()]
            if not any(fnmatch.fnmatch(relative, p) for p in patterns):
                missing.append(f"{package}: {relative}")
        self.assertEqual(missing, [])
