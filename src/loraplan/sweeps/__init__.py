"""Verify: the ablation sweep. Its spec, the engine that trains trials, the runner that schedules
them, the sweep folder (the one reader and writer of it), ranking, the report and plots, planted
tasks with a known answer and the demo built on one."""
