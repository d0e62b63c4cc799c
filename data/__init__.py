"""Readers, id maps, splits, CSR of seen items, synthetic generator."""
