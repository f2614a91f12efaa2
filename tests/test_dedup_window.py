"""The dedup window reaches every store: a store URL's dedup_window_days, or
`serve --dedup-window-days` / FLAMEUP_DEDUP_WINDOW_DAYS added to the URL."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from service.store import with_dedup_window
from service.store.cassandra import parse_url
from service.store.sqlite_engine import SqliteFile


def test_the_window_defaults_to_seven_days_on_both_stores():
    assert SqliteFile.from_url("sqlite:///./x.db").dedup_window_s == 7 * 86_400
    assert parse_url("cassandra://127.0.0.1/ks").dedup_window_s == 7 * 86_400


def test_serve_adds_the_window_to_the_store_url_unless_the_url_names_one():
    url = with_dedup_window("sqlite:///./x.db?synchronous=FULL", 0.5)
    assert url == "sqlite:///./x.db?synchronous=FULL&dedup_window_days=0.5"
    assert SqliteFile.from_url(url).dedup_window_s == 43_200
    assert parse_url(with_dedup_window("cassandra://127.0.0.1/ks", 2)).dedup_window_s == 2 * 86_400
    named = "sqlite:///./x.db?dedup_window_days=1"
    assert with_dedup_window(named, 3) == named
    assert with_dedup_window(named, None) == named


@pytest.mark.parametrize("days", ["0", "-1", "x", "4000"])
def test_a_bad_window_is_refused_with_its_name(days):
    with pytest.raises(ValueError, match="dedup_window_days"):
        SqliteFile.from_url(f"sqlite:///./x.db?dedup_window_days={days}")
    with pytest.raises(ValueError, match="dedup_window_days"):
        parse_url(f"cassandra://127.0.0.1/ks?dedup_window_days={days}")


def test_serve_refuses_a_bad_window_before_starting(tmp_path):
    done = subprocess.run(
        [sys.executable, "-m", "service", "serve", "--store", f"sqlite:///{tmp_path}/x.db", "--grpc-port", "0",
         "--http-port", "0", "--dedup-window-days", "0"],
        capture_output=True, text=True, timeout=60,
    )
    assert done.returncode == 2 and "dedup_window_days must be a number of days" in done.stderr
    done = subprocess.run(
        [sys.executable, "-m", "service", "serve", "--store", f"sqlite:///{tmp_path}/x.db", "--grpc-port", "0",
         "--http-port", "0"],
        capture_output=True, text=True, timeout=60, env={**os.environ, "FLAMEUP_DEDUP_WINDOW_DAYS": "-2"},
    )
    assert done.returncode == 2 and "dedup_window_days" in done.stderr
