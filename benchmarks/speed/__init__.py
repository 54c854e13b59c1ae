"""The parts of bench_speed.py: cases (sizes, configs, targets), runs (the commands, timed by the measure.py
wrapper; read_write.py is the physical limit), checks on the outputs, and the report."""
