"""How a local run asks Ray for its dashboard: on 127.0.0.1, only behind Ray's token, or not at all."""

from __future__ import annotations

import logging
import os

from cluster.config import load_config
from cluster.dashboard import ray_init_options, token_source


def test_dashboard_starts_on_loopback_behind_the_token(monkeypatch):
    monkeypatch.delenv("RAY_AUTH_MODE", raising=False)
    opts = ray_init_options(load_config(None, ["run.dashboard_port=8999"]).run)
    assert opts == {
        "include_dashboard": True,
        "dashboard_host": "127.0.0.1",
        "dashboard_port": 8999,
        "logging_level": logging.WARNING,
    }
    assert "RAY_AUTH_MODE" not in os.environ  # ray.init itself turns the token on for a new cluster


def test_no_dashboard_without_the_token_or_when_turned_off(monkeypatch, capsys):
    monkeypatch.setenv("RAY_AUTH_MODE", "disabled")
    assert ray_init_options(load_config(None, []).run) == {"include_dashboard": False}
    err = capsys.readouterr().err
    assert "no Ray dashboard: RAY_AUTH_MODE=disabled" in err and "run.dashboard=false" in err
    assert ray_init_options(load_config(None, ["run.dashboard=false"]).run) == {"include_dashboard": False}
    assert capsys.readouterr().err == ""


def test_token_source_names_where_ray_reads_the_token(monkeypatch, tmp_path):
    monkeypatch.setenv("RAY_AUTH_TOKEN", "x" * 32)
    assert token_source() == "the RAY_AUTH_TOKEN environment variable"
    monkeypatch.delenv("RAY_AUTH_TOKEN")
    monkeypatch.setenv("RAY_AUTH_TOKEN_PATH", str(tmp_path / "t"))
    assert token_source() == str(tmp_path / "t")
    monkeypatch.delenv("RAY_AUTH_TOKEN_PATH")
    monkeypatch.setenv("HOME", str(tmp_path))
    assert token_source() == str(tmp_path / ".ray" / "auth_token")
