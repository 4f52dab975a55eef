"""Integrations with other training front ends: ``hf_trainer`` (GORP in a ``transformers.Trainer``,
task boundaries included). Import the submodule: ``from gorp_ds.integrations.hf_trainer import
GorpTrainer``."""
