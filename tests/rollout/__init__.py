"""The ordered rollout: pure rules, the coordination store, restart jobs and health gates, and
simulated clusters of `rke2certd run` processes on real etcd and on a shared SQLite file."""
