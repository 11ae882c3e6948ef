"""Principals, keys and (next) plans, pricing and ledgers. `principals.py` is pure;
`keys.py` is the key store's interface and the mounted keys file; the state store's
backends are `sqlite_backend.py` and `redis_backend.py`."""
