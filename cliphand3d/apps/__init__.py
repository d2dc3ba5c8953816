"""What uses the library: the scripts' apps (demo, benchmark, ONNX export, the released-weights import, the
run summary, the data doctor) and how scripts print errors (cli). Nothing in the library imports them."""
