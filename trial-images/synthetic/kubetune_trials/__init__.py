"""Example trials for kubetune: training programs that report through the metrics file protocol."""
