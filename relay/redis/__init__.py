"""The Redis layer: one Redis, a Sentinel-managed primary or a Redis Cluster.

The store, the hub, the audit and the server use this package's small public
face and speak in keys; only this package knows the topology (`address`).
"""
