"""Accuracy evaluation (Pass@k, Avg@k) of a checkpoint or a temperature cell, and the sweep grid."""
