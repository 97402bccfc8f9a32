"""Tests of the pure-PyTorch references, one module per op family (``test_<family>.py``)."""
