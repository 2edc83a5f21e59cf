"""Proteus distillation pretraining."""
