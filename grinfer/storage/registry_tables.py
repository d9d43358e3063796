"""The model registry's tables (schema version 3 of both SQL stores; grinfer.registry reads and writes them).

One statement list, valid in SQLite and PostgreSQL alike (JSON is kept as text, times as unix seconds):

- ``model_versions(name, version, path, content_hash, config, metrics, stage, created_at)``: every
  registered version of a named model; `stage` is ``staging``, ``production`` or ``archived``.
- ``experiments(name, model, shadow_version, shadow_fraction, started_at, stopped_at)``: A/B tests of a
  model, each with an optional shadow version scoring a sampled fraction of its traffic in the background.
- ``experiment_arms(experiment, arm, version, weight)``: an experiment's arms; a NULL version follows the
  model's production version (so a promotion during a test moves the control arm with it).
"""

REGISTRY_TABLES = [
    """CREATE TABLE model_versions (
        name TEXT NOT NULL,
        version INTEGER NOT NULL,
        path TEXT NOT NULL,
        content_hash TEXT NOT NULL,
        config TEXT NOT NULL,
        metrics TEXT NOT NULL,
        stage TEXT NOT NULL DEFAULT 'staging',
        created_at DOUBLE PRECISION NOT NULL,
        PRIMARY KEY (name, version)
    )""",
    """CREATE TABLE experiments (
        name TEXT PRIMARY KEY,
        model TEXT NOT NULL,
        shadow_version INTEGER,
        shadow_fraction DOUBLE PRECISION NOT NULL DEFAULT 0,
        started_at DOUBLE PRECISION NOT NULL,
        stopped_at DOUBLE PRECISION
    )""",
    """CREATE TABLE experiment_arms (
        experiment TEXT NOT NULL REFERENCES experiments(name),
        arm TEXT NOT NULL,
        version INTEGER,
        weight DOUBLE PRECISION NOT NULL,
        PRIMARY KEY (experiment, arm)
    )""",
]
