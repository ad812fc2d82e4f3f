"""django-distcache: a Django cache on Redis Cluster that survives real traffic."""

__version__ = "0.1.0.dev0"
