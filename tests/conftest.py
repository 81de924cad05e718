"""The longer tests share the reference tier's federations and trained runs (test_all.py)."""
from test_all import one_site, three_site_results, three_sites  # noqa: F401 (fixtures)
