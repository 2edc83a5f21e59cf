"""Fine-grained transfer: frozen CLS features + logistic regression on 12 datasets (PROTOCOLS C)."""
