"""The tests' own PostgreSQL: the session's server (configured, local, or a throwaway cluster)
and the throwaway cluster itself, started and removed."""

from __future__ import annotations

import pytest

from helpers import ThrowawayPostgres, choose_pg_server, pg_answers, pg_bindir, with_database


def test_configured_url_wins(monkeypatch):
    monkeypatch.setenv("MNIST_TUNE_TEST_PG", "postgresql://someone@db.example:6543/admin")
    assert choose_pg_server() == ("postgresql://someone@db.example:6543/admin", None)


def test_no_server_and_no_binaries_is_one_skip_reason(monkeypatch):
    import helpers

    monkeypatch.delenv("MNIST_TUNE_TEST_PG", raising=False)
    monkeypatch.setattr(helpers, "pg_answers", lambda url, timeout=3: False)
    monkeypatch.setattr(helpers, "pg_bindir", lambda: None)
    with pytest.raises(helpers.NoPostgres, match="no PostgreSQL server binaries"):
        helpers.choose_pg_server()


def test_with_database_keeps_the_rest_of_the_url():
    assert (with_database("postgresql://u:p@h:5433/postgres?sslmode=disable", "x1")
            == "postgresql://u:p@h:5433/x1?sslmode=disable")


@pytest.mark.postgres
def test_postgres_db_serves_optuna(postgres_db, pg_admin_url):
    """A fresh database on the session's server, usable by Optuna through SQLAlchemy + psycopg."""
    import optuna
    import psycopg

    assert postgres_db.rsplit("/", 1)[0] == pg_admin_url.split("?")[0].rsplit("/", 1)[0]  # same server
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(study_name="fixture-check", storage=postgres_db)
    study.optimize(lambda t: t.suggest_float("x", 0, 1), n_trials=2)
    assert len(optuna.load_study(study_name="fixture-check", storage=postgres_db).trials) == 2
    with psycopg.connect(postgres_db, connect_timeout=5) as conn:
        assert conn.execute("SELECT current_database()").fetchone()[0] == postgres_db.rsplit("/", 1)[1]


@pytest.mark.postgres
def test_helper_sees_the_session_server(pg_admin_url):
    import helpers

    assert helpers.pg_admin_url() == pg_admin_url


@pytest.mark.postgres
def test_throwaway_cluster_starts_and_is_removed():
    """The fallback used when nothing answers on 5432, exercised even where something does."""
    bindir = pg_bindir()
    if bindir is None:
        pytest.skip("no PostgreSQL server binaries (initdb, pg_ctl) installed")
    cluster = ThrowawayPostgres(bindir)
    url = cluster.start()
    folder = cluster.folder
    try:
        assert url == f"postgresql://postgres@127.0.0.1:{cluster.port}/postgres"
        assert cluster.port != 5432
        assert pg_answers(url)
        assert (folder / "sock" / f".s.PGSQL.{cluster.port}").exists()  # socket in the temp folder
    finally:
        cluster.stop()
    assert not folder.exists()
    assert not pg_answers(url, timeout=2)
