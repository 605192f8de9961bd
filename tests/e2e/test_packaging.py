"""What the built package says about itself: the license as an SPDX expression (PEP 639, setuptools
77+; the table form made every install print a deprecation warning) with the license text shipped.

Built with the same backend pip uses (setuptools.build_meta), in a subprocess: the wheel's metadata
and the sdist, so the test holds on every Python the project supports (3.10 included).
"""

from __future__ import annotations

import subprocess
import sys
import tarfile
from email.parser import Parser
from pathlib import Path

from tests.conftest import REPO

BUILD = """
import sys
import setuptools.build_meta as backend
meta, sdist, result = sys.argv[1:]  # read first: the backend rewrites sys.argv for setup()
names = [backend.prepare_metadata_for_build_wheel(meta), backend.build_sdist(sdist)]
with open(result, "w") as out:
    out.write(" ".join(names))
"""


def test_the_built_package_declares_apache_2_and_ships_the_license(tmp_path):
    meta_dir, sdist_dir = tmp_path / "meta", tmp_path / "sdist"
    meta_dir.mkdir()
    sdist_dir.mkdir()
    done = subprocess.run(
        [sys.executable, "-c", BUILD, str(meta_dir), str(sdist_dir), str(tmp_path / "names")],
        cwd=REPO,
        capture_output=True,
        text=True,
    )
    assert done.returncode == 0, done.stderr
    assert "SetuptoolsDeprecationWarning" not in done.stderr, done.stderr
    dist_info, sdist_name = (tmp_path / "names").read_text().split()
    wheel_meta = Parser().parsestr((meta_dir / dist_info / "METADATA").read_text())
    assert wheel_meta["License-Expression"] == "Apache-2.0"
    assert wheel_meta.get_all("License-File") == ["LICENSE"]
    assert wheel_meta["License"] is None  # the deprecated free-text field is not written
    assert (meta_dir / dist_info / "licenses" / "LICENSE").read_text() == (REPO / "LICENSE").read_text()
    license_text = (REPO / "LICENSE").read_text()
    assert "Apache License" in license_text and "Version 2.0, January 2004" in license_text
    assert "END OF TERMS AND CONDITIONS" in license_text  # the full text, not a pointer to it
    with tarfile.open(sdist_dir / sdist_name) as sdist:
        names = sdist.getnames()
        root = Path(names[0]).parts[0]
        assert f"{root}/LICENSE" in names
        pkg_info = Parser().parsestr(sdist.extractfile(f"{root}/PKG-INFO").read().decode())
    assert pkg_info["License-Expression"] == "Apache-2.0"
