"""Command-line tools that drive the evaluations and the PCA pictures (`python -m scripts.<name>`)."""
