"""An RKE2 stand-in for tests: what an RKE2 node does with its certificates, its bootstrap data
and its embedded etcd at start, written from upstream's behaviour (K3s, which RKE2 embeds) and
independent of rke2certd (nothing here imports it).

    server = RKE2Server(tmp / "s1", "s1", {"token": "secret"})
    server.start()      # the package's ExecStartPre= first, then RKE2's start
    joiner = RKE2Server(tmp / "s2", "s2", {"server": server.url, "token": token})
    ...
    server.stop()

See node.py for the start's steps, bootstrap.py for the bootstrap data and its reconcile,
certs.py for the certificates, supervisor.py for the routes, rotate.py for rotate-ca's checks.
"""
