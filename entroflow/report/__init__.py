"""Figures and the experiment summary, from the files earlier rules wrote."""
