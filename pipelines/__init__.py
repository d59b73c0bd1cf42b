"""Thin command-line scripts over the actr_core public API (the only place Ray appears)."""
