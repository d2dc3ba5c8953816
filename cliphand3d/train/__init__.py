"""Training: the run (run.py: scripts/train.py's work), its loop, optimiser and schedule, resume, guards, EMA and
what it logs. May use evaluation/ (train-time validation scores as eval.py does); evaluation never uses it."""
