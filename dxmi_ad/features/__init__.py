"""Frozen pretrained backbones that turn images into per-location feature vectors."""
