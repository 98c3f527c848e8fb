"""Debugging tools on top of any backend: tracing stages to APRT files, stage diffs, bisection and teaching
faults.
"""
