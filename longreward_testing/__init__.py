"""Test support that the test suite and the benchmarks share: the loopback judge double
(`judge_double`, also runnable as a process), judge configs aimed at it and a small scored input
(`scenarios`), and the judge-fault scenarios (`faults`)."""
