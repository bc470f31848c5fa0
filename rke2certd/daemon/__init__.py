"""The daemon (`rke2certd run`) and what ties it to systemd: sd_notify (`notify`), the staging
dir watcher and rollout coordination."""
