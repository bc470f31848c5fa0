"""Cluster-wide rollout coordination through the datastore (the rules are in plan/rollout.py).

- `records`: the keys under /rke2certd/ and their JSON;
- `cluster_store`: reads and compare-and-swap writes of those keys (`ClusterStore`);
- `create`: turning a saved CA generation or a renewal into a rollout record (from plain facts);
- `link`: the background threads that keep the node's lease alive and watch the keys
  (through datastore/stream.py, the long-lived etcd watch stream);
- `health`: the probes of the restart gate;
- `job`: the restart command and health gate, run off the main loop with timeouts;
- `runner`: what the daemon's main loop calls (`RolloutRunner`): `role` what it asks of the
  node's kind (rke2certd/roles/ implements it), `presence` the node's registration, `restart`
  its restart job and the status it reports.
"""
