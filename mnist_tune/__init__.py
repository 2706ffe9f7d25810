"""mnist-tune: Optuna sweeps over MNIST models, every trial tracked in MLflow.

Data flows one way: cli -> config -> study -> (space, models, data, train, tracking).
``models`` and ``train`` know nothing of Optuna or MLflow.
"""

__version__ = "0.1.0"
