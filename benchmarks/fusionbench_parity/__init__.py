"""The parts of compare_fusionbench.py: cases (shapes, cases, both tools' jobs), compare (tensor differences,
tolerance, conditioning) and report."""
