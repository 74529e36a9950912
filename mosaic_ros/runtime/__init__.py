"""Streaming video-language runtime: frames in, answers out. Knows nothing of ROS."""
