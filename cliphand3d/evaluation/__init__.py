"""Predictions over a split and their scores under the data's official protocol: what train-time validation
and eval.py share (predict, scoring, baselines, figures, report), and eval.py's work (run)."""
