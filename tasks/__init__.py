"""Pipeline stages: pure functions plus thin Prefect ``@task`` wrappers over files."""
