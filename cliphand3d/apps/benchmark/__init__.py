"""`python scripts/benchmark.py`: what inference, training and data cost on this machine, in one run.

One module per section (inference, params, train_step, loader, joint_features, options, eval_stream),
each timing its measurements with the harness (harness.py: medians over repeats after warm-up, ratios
of figures measured in alternating rounds) and reporting rows {section, name, value, unit, note};
run.py runs the chosen sections, marks the targets in configs/benchmark.yaml and writes benchmark.json
and benchmark.md. docs/benchmark.md says what each row measures and how to read it.
"""
