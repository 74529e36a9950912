"""The policy benchmark: one stream, one set of questions, every policy, one process."""
