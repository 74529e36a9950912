"""ROS 2 nodes and command-line tools. They wire ROS to ``mosaic_ros.runtime`` and nothing else."""
