"""``python -m mlflow_tg.predictor``: fit, evaluate and register the performance predictor."""

from mlflow_tg.predictor.job import main

if __name__ == "__main__":
    main()
