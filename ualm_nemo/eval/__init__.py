"""Evaluation: metric statistics and benchmark scorers (TTA metrics, MMAU/MMAR, text benchmarks)."""
