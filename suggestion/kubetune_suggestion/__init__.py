"""kubetune's suggestion side: the pure engine, the service, the store and the local runner."""
