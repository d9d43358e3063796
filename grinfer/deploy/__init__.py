"""Balancer configurations for a fleet of grinfer replicas: nginx, HAProxy and Envoy, each hashing the
`X-User-Id` header consistently so that a user's requests (and K/V cache) stay on one replica.

`grinfer deploy nginx|haproxy|envoy --replicas HOST:PORT,...` writes one; the files under deploy/ in the
repository are these generators' output for the Compose file's three replicas. Nothing here balances
traffic itself: the real balancers do.
"""
