"""Local storage: the one module that writes files, and the node lock."""
