"""Graph capture in training loops other than ``train.py``'s: your own, or PyTorch Lightning's.

``watch.py`` is the plain-PyTorch API (``mlflow_tg.watch``); ``lightning.py`` the Lightning
callback, which needs the optional ``lightning`` package (``pip install -e '.[lightning]'``).
"""
