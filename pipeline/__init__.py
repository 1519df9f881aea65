"""The compression pipeline around the convheads library: its stages (stages/, one module each),
the runner that skips and resumes them (runner.py), their order (dag.py), the one configuration
schema (config.py), MLflow tracking (tracking.py) and the model registry (registry.py).

Nothing here imports Prefect: the flows (flows/) and DVC (dvc.yaml, `python -m pipeline`) call
the same stages.
"""
