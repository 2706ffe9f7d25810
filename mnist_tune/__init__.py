"""mnist-tune: Optuna sweeps over MNIST models, every trial tracked in MLflow.

Data flows one way: cli -> config -> worker -> (study, record -> tracking, run -> models, data,
train). ``models`` and ``train`` know nothing of Optuna or MLflow.
"""

__version__ = "0.2.0"
