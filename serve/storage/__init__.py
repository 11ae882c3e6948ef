"""Where images and their sidecars live. `store.py` is the object store's interface
and its factory (`file:///path` or `s3://bucket/prefix`); `local.py` and `s3.py` are
its backends, run through one contract suite (tests/unit/test_storage_contract.py)."""
