"""Helpers that start real components (etcd, journald, systemd containers) for tests."""
