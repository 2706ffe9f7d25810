-- Run once by the official postgres image, on the first start with an empty data volume.
-- Files in /docker-entrypoint-initdb.d/ are run with psql as $POSTGRES_USER, so that user
-- (the app user) owns both databases. To start over: `docker compose ... down -v` (this
-- deletes the volume and every study and run in it).
CREATE DATABASE optuna;  -- Optuna storage: studies, trials, heartbeats
CREATE DATABASE mlflow;  -- MLflow backend store: experiments, runs, metrics, model registry
