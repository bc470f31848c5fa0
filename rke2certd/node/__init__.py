"""The node's lower layer: what a command or the daemon reads and keeps of this node
(its config and layout, CA material, bootstrap data, cert facts, staged sets, kubeconfigs and
other node files, which datastore it uses)."""
