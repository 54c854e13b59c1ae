"""The parts of compare_mergekit.py: cases (inputs, methods, variants, YAMLs), compare (tensor differences and
the tie probe) and report."""
