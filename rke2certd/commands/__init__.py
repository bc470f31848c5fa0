"""The shell of each command: read, call the pure planner, write under the node lock, log events."""
