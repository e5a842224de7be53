"""Datasets as compact uint8 tensors, pure-numpy client partitions, and per-client batch sampling."""
