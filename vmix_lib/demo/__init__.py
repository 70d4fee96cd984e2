"""The CPU demonstration of VMix (``python -m vmix_lib.demo``): synthetic data and measurements
(data.py), the base model, both adapters and the λ sweep (experiment.py)."""
