"""Cluster planning: per-node sizing estimates for the model presets (checked against cluster.yaml)."""
