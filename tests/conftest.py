"""The longer tests share the reference tier's federations and trained runs (test_all.py), and one bench run."""
import contextlib
import io

import pytest

import bench
from test_all import TINY, one_site, three_site_results, three_sites  # noqa: F401 (fixtures)


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory):
    """All seven schemes on a tiny federation, trained and attacked by the bench (--attack, 30 decoder steps):
    (rows, what it printed, its folder)."""
    folder, out = tmp_path_factory.mktemp("tiny"), io.StringIO()
    with contextlib.redirect_stdout(out):
        rows = bench.main(TINY + ["--attack", "--attack-steps", "30", "--json", str(folder / "rows.json"),
                                  "--csv", str(folder / "rows.csv")])
    return rows, out.getvalue(), folder
