"""Command-line entry points that need no ROS: offline runs and benchmarks."""
