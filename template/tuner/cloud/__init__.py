"""Azure: the az wrapper, Container Apps and Azure ML. The standard library only (tests/test_package.py)."""
